//! What a `patient/` scope can reach, type by type, written down in one
//! place.
//!
//! A `patient/` scope is bound to one patient, and everything it reaches
//! must be that patient's or nobody's. Three kinds of resource type:
//! - **the patient's record**: the types of the R4 Patient compartment
//!   (confined by the compartment's reference parameters), and the types
//!   outside it that still hold one patient's data, confined by their own
//!   reference to the patient ([`LINKED`]);
//! - **shared reference data** that describes no patient (organisations,
//!   practitioners, medications, terminology, …): readable, never writable,
//!   under a `patient/` scope ([`SHARED`]);
//! - **everything else** (`Bundle`, `MessageHeader`, `Binary`, `Linkage`,
//!   payment and subscription types, …): can hold anyone's data and cannot be
//!   confined to one patient, so a `patient/` scope reaches none of it.
//!
//! Deny by default: a type in none of these lists is in the third kind.

use crate::search::compartment::{compartment_params, in_compartment_definition};

/// Types outside the Patient compartment that hold one patient's data, with
/// the reference parameters that name the patient.
pub const LINKED: &[(&str, &[&str])] = &[
    ("Device", &["patient"]),
    ("Task", &["patient", "subject"]),
    ("Contract", &["patient", "subject"]),
    ("GuidanceResponse", &["patient", "subject"]),
];

/// Shared reference data: read-only to `patient/` scopes.
pub const SHARED: &[&str] = &[
    "ActivityDefinition",
    "CapabilityStatement",
    "ChargeItemDefinition",
    "CodeSystem",
    "CompartmentDefinition",
    "ConceptMap",
    "DeviceDefinition",
    "EffectEvidenceSynthesis",
    "Endpoint",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "GraphDefinition",
    "HealthcareService",
    "ImplementationGuide",
    "InsurancePlan",
    "Library",
    "Location",
    "Measure",
    "Medication",
    "MedicationKnowledge",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "NamingSystem",
    "OperationDefinition",
    "Organization",
    "OrganizationAffiliation",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Questionnaire",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "RiskEvidenceSynthesis",
    "SearchParameter",
    "Slot",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "TerminologyCapabilities",
    "TestScript",
    "ValueSet",
];

/// How a `patient/` scope reaches a resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// The patient's own: resources referring to the patient through one
    /// of these parameters (the Patient itself: by id).
    Own(Vec<String>),
    /// Shared reference data: read and search only.
    Shared,
    /// Not at all.
    None,
}

/// How a `patient/` scope reaches `rtype`.
pub fn reach(rtype: &str) -> Reach {
    if rtype == "Patient" {
        return Reach::Own(Vec::new());
    }
    if in_compartment_definition("Patient", rtype) {
        return Reach::Own(compartment_params("Patient", rtype));
    }
    if let Some((_, params)) = LINKED.iter().find(|(t, _)| *t == rtype) {
        return Reach::Own(params.iter().map(|p| p.to_string()).collect());
    }
    if SHARED.contains(&rtype) {
        return Reach::Shared;
    }
    Reach::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::registry::{registry, Kind};

    #[test]
    fn linked_parameters_are_indexed_references() {
        for (t, ps) in LINKED {
            assert!(!in_compartment_definition("Patient", t), "{t}");
            for p in *ps {
                assert!(
                    registry()
                        .get(t, p)
                        .is_some_and(|d| d.kind == Kind::Reference && d.supported()),
                    "{t}.{p}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_both_shared_and_a_record() {
        for t in SHARED {
            assert!(crate::fhir::types::is_resource_type(t), "{t}");
            assert!(!in_compartment_definition("Patient", t), "{t}");
            assert!(LINKED.iter().all(|(l, _)| l != t), "{t}");
        }
    }

    #[test]
    fn unlisted_types_are_denied() {
        for t in [
            "Bundle",
            "MessageHeader",
            "Binary",
            "Linkage",
            "Subscription",
        ] {
            assert_eq!(reach(t), Reach::None, "{t}");
        }
        assert_eq!(reach("Organization"), Reach::Shared);
        assert!(matches!(reach("Device"), Reach::Own(p) if p == ["patient"]));
        assert!(
            matches!(reach("Observation"), Reach::Own(p) if p.contains(&"subject".to_string()))
        );
    }
}
