//! Who a caller is in the circle of trust, from its token.
//!
//! Scopes say what a client may ask for; the role says whose record the
//! person or organisation behind it may see at all. A role with no rule in
//! [`crate::policy::consent`] gets nothing beyond its scopes' own limits.

/// The role of a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A patient (`fhirUser` Patient/ID): their own record.
    Patient(String),
    /// A related person (`fhirUser` RelatedPerson/ID): what the patient's
    /// Consent grants them.
    RelatedPerson(String),
    /// A practitioner (`fhirUser` Practitioner/ID, or PractitionerRole/ID
    /// for one of their roles): their patients and what Consents grant.
    Practitioner(Practitioner),
    /// A backend client bound to an insurer's Organization at
    /// registration: the permitted part of its members' records, by the
    /// named insurer role of the policy file.
    Insurer { organization: String, rules: String },
    /// A backend client registered by the administrator without an
    /// organisation: its scopes, nothing narrower.
    System,
    /// A subscribed hospital system (signed-XML exchange).
    Subscriber,
    /// ehrx's own maintenance jobs and the operator's CLI.
    Administrator,
    /// A user whose `fhirUser` names none of the above: nothing.
    Nobody,
}

/// How a practitioner signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Practitioner {
    Id(String),
    Role(String),
}

impl Role {
    /// The role of a token: its `fhirUser` for a person, its client's
    /// organisation for a backend client.
    pub fn of_token(
        fhir_user: Option<&str>,
        organization: Option<&str>,
        insurer_role: Option<&str>,
    ) -> Role {
        match fhir_user.and_then(|u| u.split_once('/')) {
            Some(("Patient", id)) => Role::Patient(id.to_string()),
            Some(("RelatedPerson", id)) => Role::RelatedPerson(id.to_string()),
            Some(("Practitioner", id)) => Role::Practitioner(Practitioner::Id(id.to_string())),
            Some(("PractitionerRole", id)) => {
                Role::Practitioner(Practitioner::Role(id.to_string()))
            }
            Some(_) => Role::Nobody,
            None => match organization {
                Some(o) => Role::Insurer {
                    organization: o.to_string(),
                    rules: insurer_role.unwrap_or("claims").to_string(),
                },
                None => Role::System,
            },
        }
    }

    /// Whether what this role sees depends on stored Consents, care
    /// relationships or coverage, loaded afresh for every request.
    pub fn needs_circle(&self) -> bool {
        matches!(
            self,
            Role::RelatedPerson(_) | Role::Practitioner(_) | Role::Insurer { .. }
        )
    }

    /// The reference naming this caller (`Practitioner/X`, …), if any.
    pub fn reference(&self) -> Option<String> {
        match self {
            Role::Patient(id) => Some(format!("Patient/{id}")),
            Role::RelatedPerson(id) => Some(format!("RelatedPerson/{id}")),
            Role::Practitioner(Practitioner::Id(id)) => Some(format!("Practitioner/{id}")),
            Role::Practitioner(Practitioner::Role(id)) => Some(format!("PractitionerRole/{id}")),
            Role::Insurer { organization, .. } => Some(format!("Organization/{organization}")),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Role::Patient(_) => "patient",
            Role::RelatedPerson(_) => "related-person",
            Role::Practitioner(_) => "practitioner",
            Role::Insurer { .. } => "insurer",
            Role::System => "system",
            Role::Subscriber => "subscriber",
            Role::Administrator => "administrator",
            Role::Nobody => "nobody",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_fhir_user_or_the_clients_organisation() {
        assert_eq!(
            Role::of_token(Some("Patient/p1"), None, None),
            Role::Patient("p1".into())
        );
        assert_eq!(
            Role::of_token(Some("PractitionerRole/r"), None, None),
            Role::Practitioner(Practitioner::Role("r".into()))
        );
        assert_eq!(
            Role::of_token(None, Some("ins"), None),
            Role::Insurer {
                organization: "ins".into(),
                rules: "claims".into()
            }
        );
        assert_eq!(Role::of_token(None, None, None), Role::System);
        assert_eq!(Role::of_token(Some("Device/d"), None, None), Role::Nobody);
        assert!(Role::of_token(Some("Practitioner/x"), None, None).needs_circle());
        assert!(!Role::of_token(Some("Patient/x"), None, None).needs_circle());
    }
}
