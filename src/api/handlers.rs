//! Thin handlers: request → interaction → response.

use axum::extract::{Path, State};
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::request::{FhirRequest, FhirResponse, Return};
use super::AppState;
use crate::error::{Error, Result};
use crate::fhir::bundle::etag;
use crate::fhir::{operation_outcome, Issue};
use crate::interaction::{self, bundle, Written};
use crate::store::{HistoryScope, Version};

/// `Last-Modified` from a stored instant.
fn http_date(instant: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(instant)
        .ok()
        .map(|t| httpdate::fmt_http_date(std::time::SystemTime::from(t)))
}

fn version_headers(mut r: FhirResponse, version: i64, last_updated: &str) -> FhirResponse {
    r = r.header(header::ETAG, etag(version));
    if let Some(d) = http_date(last_updated) {
        r = r.header(header::LAST_MODIFIED, d);
    }
    r
}

/// A stored version as a response (read, vread).
fn stored(v: Version) -> FhirResponse {
    let r = FhirResponse::new(StatusCode::OK);
    let r = version_headers(r, v.version, &v.last_updated);
    r.with_json(v.body.unwrap_or_default())
}

/// A write's response, honouring `Prefer: return`.
fn written(state: &AppState, req: &FhirRequest, w: Written) -> FhirResponse {
    let location = format!("{}/{}", state.env.base, w.versioned_path());
    let mut r = version_headers(FhirResponse::new(w.status), w.version, &w.last_updated);
    r = r.header(
        // 202: a proposed amendment; the Location is its Task.
        if w.status == StatusCode::CREATED || w.status == StatusCode::ACCEPTED {
            header::LOCATION
        } else {
            header::CONTENT_LOCATION
        },
        location,
    );
    match req.prefer_return() {
        Return::Minimal => r,
        Return::Representation => match w.resource {
            Some(res) => r.with_value(res),
            None => r,
        },
        Return::OperationOutcome => r.with_value(operation_outcome(&[Issue::information(
            format!("{}/{} version {} stored", w.rtype, w.id, w.version),
        )])),
    }
}

fn deleted(state: &AppState, req: &FhirRequest, w: Option<Written>, what: &str) -> FhirResponse {
    if let Some(w) = w.as_ref().filter(|w| w.status == StatusCode::ACCEPTED) {
        // A proposed deletion: the record is unchanged, the Task answers.
        return written(state, req, w.clone());
    }
    let mut r = match req.prefer_return() {
        Return::OperationOutcome => FhirResponse::new(StatusCode::OK).with_value(
            operation_outcome(&[Issue::information(match &w {
                Some(_) => format!("{what} deleted"),
                None => format!("{what}: nothing to delete"),
            })]),
        ),
        _ => FhirResponse::new(StatusCode::NO_CONTENT),
    };
    if let Some(w) = w {
        r = r.header(header::ETAG, etag(w.version));
    }
    r
}

pub async fn metadata(State(state): State<AppState>, req: FhirRequest) -> Response {
    let cs = super::capability_statement(&state.env.base);
    req.respond(Ok(FhirResponse::new(StatusCode::OK).with_value(cs)))
}

pub async fn read(Path((rtype, id)): Path<(String, String)>, req: FhirRequest) -> Response {
    let result = async {
        let mut r = req.gate.reader().await?;
        Ok(stored(interaction::read(&mut r.view(), &rtype, &id).await?))
    };
    req.respond(result.await)
}

pub async fn vread(
    Path((rtype, id, vid)): Path<(String, String, String)>,
    req: FhirRequest,
) -> Response {
    let result = async {
        let mut r = req.gate.reader().await?;
        Ok(stored(
            interaction::vread(&mut r.view(), &rtype, &id, &vid).await?,
        ))
    };
    req.respond(result.await)
}

pub async fn create(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    let result = async {
        interaction::check_type(&rtype)?;
        let resource = req.resource()?;
        let if_none_exist = req
            .header("if-none-exist")
            .map(|q| q.trim_start_matches('?'));
        let mut tx = req.gate.begin().await?;
        let w = interaction::create(&mut tx, &rtype, resource, if_none_exist).await?;
        tx.commit().await?;
        Ok(written(&state, &req, w))
    };
    req.respond(result.await)
}

pub async fn update(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    req: FhirRequest,
) -> Response {
    let result = async {
        interaction::check_type(&rtype)?;
        let resource = req.resource()?;
        let if_match = req.if_match()?;
        let mut tx = req.gate.begin().await?;
        let w = interaction::update(&mut tx, &rtype, &id, resource, if_match).await?;
        tx.commit().await?;
        Ok(written(&state, &req, w))
    };
    req.respond(result.await)
}

fn criteria(req: &FhirRequest) -> Result<&str> {
    match req.raw_query.as_deref() {
        Some(q) if !q.is_empty() => Ok(q),
        _ => Err(Error::MethodNotAllowed(
            "this operation on a resource type needs search criteria (Type?param=value)".into(),
        )),
    }
}

/// Criteria without result-shaping parameters such as `_format`.
fn criteria_only(q: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| !crate::search::RESULT_PARAMS.contains(&k.as_ref())),
        )
        .finish()
}

pub async fn conditional_update(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    let result = async {
        interaction::check_type(&rtype)?;
        let query = criteria_only(criteria(&req)?);
        let resource = req.resource()?;
        let if_match = req.if_match()?;
        let mut tx = req.gate.begin().await?;
        let w =
            interaction::conditional_update(&mut tx, &rtype, &query, resource, if_match).await?;
        tx.commit().await?;
        Ok(written(&state, &req, w))
    };
    req.respond(result.await)
}

pub async fn delete(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    req: FhirRequest,
) -> Response {
    let result = async {
        let if_match = req.if_match()?;
        let mut tx = req.gate.begin().await?;
        let w = interaction::delete(&mut tx, &rtype, &id, if_match).await?;
        tx.commit().await?;
        Ok(deleted(&state, &req, w, &format!("{rtype}/{id}")))
    };
    req.respond(result.await)
}

pub async fn conditional_delete(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    let result = async {
        interaction::check_type(&rtype)?;
        let query = criteria_only(criteria(&req)?);
        let mut tx = req.gate.begin().await?;
        let w = interaction::conditional_delete(&mut tx, &rtype, &query).await?;
        tx.commit().await?;
        Ok(deleted(&state, &req, w, &format!("{rtype}?{query}")))
    };
    req.respond(result.await)
}

pub async fn patch(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    req: FhirRequest,
) -> Response {
    let result = async {
        interaction::check_type(&rtype)?;
        let doc = req.json_patch()?;
        let if_match = req.if_match()?;
        let mut tx = req.gate.begin().await?;
        let w = interaction::patch(&mut tx, &rtype, &id, &doc, if_match).await?;
        tx.commit().await?;
        Ok(written(&state, &req, w))
    };
    req.respond(result.await)
}

pub async fn conditional_patch(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    let result = async {
        interaction::check_type(&rtype)?;
        let query = criteria_only(criteria(&req)?);
        let doc = req.json_patch()?;
        let if_match = req.if_match()?;
        let mut tx = req.gate.begin().await?;
        let w = interaction::conditional_patch(&mut tx, &rtype, &query, &doc, if_match).await?;
        tx.commit().await?;
        Ok(written(&state, &req, w))
    };
    req.respond(result.await)
}

async fn history(
    state: &AppState,
    req: &FhirRequest,
    scope: HistoryScope<'_>,
) -> Result<FhirResponse> {
    let mut r = req.gate.reader().await?;
    let b = interaction::history(&mut r.view(), &state.env, scope, &req.params).await?;
    Ok(FhirResponse::new(StatusCode::OK).with_bundle(b))
}

pub async fn history_system(State(state): State<AppState>, req: FhirRequest) -> Response {
    req.respond(history(&state, &req, HistoryScope::System).await)
}

pub async fn history_type(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    req.respond(history(&state, &req, HistoryScope::Type(&rtype)).await)
}

pub async fn history_instance(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    req: FhirRequest,
) -> Response {
    req.respond(history(&state, &req, HistoryScope::Instance(&rtype, &id)).await)
}

async fn search(
    state: &AppState,
    req: &FhirRequest,
    rtype: &str,
    params: &[(String, String)],
) -> Result<FhirResponse> {
    let mut r = req.gate.reader().await?;
    let b = interaction::search(
        &mut r.view(),
        &state.env,
        rtype,
        params,
        req.strict_handling(),
    )
    .await?;
    Ok(FhirResponse::new(StatusCode::OK).with_bundle(b))
}

pub async fn search_type(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    req.respond(search(&state, &req, &rtype, &req.params).await)
}

/// `POST Type/_search` with an `application/x-www-form-urlencoded` body.
pub async fn search_post(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    req: FhirRequest,
) -> Response {
    let result = async {
        let ct = req.header("content-type").unwrap_or("");
        if !ct.starts_with("application/x-www-form-urlencoded") {
            return Err(Error::UnsupportedMediaType(format!(
                "{ct} (_search accepts application/x-www-form-urlencoded)"
            )));
        }
        let mut params = req.params.clone();
        params.extend(form_urlencoded::parse(&req.body).into_owned());
        search(&state, &req, &rtype, &params).await
    };
    req.respond(result.await)
}

/// `GET /?_type=A,B&…`: search across the listed types.
pub async fn system_search(State(state): State<AppState>, req: FhirRequest) -> Response {
    let result = async {
        let mut r = req.gate.reader().await?;
        let b = interaction::system_search(
            &mut r.view(),
            &state.env,
            &req.params,
            req.strict_handling(),
        )
        .await?;
        Ok(FhirResponse::new(StatusCode::OK).with_bundle(b))
    };
    req.respond(result.await)
}

/// `GET /Patient/{id}/$everything`, or a compartment search such as
/// `GET /Patient/{id}/Observation?…`.
pub async fn compartment_or_operation(
    State(state): State<AppState>,
    Path((rtype, id, what)): Path<(String, String, String)>,
    req: FhirRequest,
) -> Response {
    let result = async {
        if what == "$signed-document" && rtype == "Patient" {
            let exchange = state.exchange().await?;
            // The caller's scopes decide what goes into the document.
            let xml = crate::exchange::outbound::signed_document(
                &req.gate,
                &state.store,
                &state.env,
                &exchange,
                &id,
                &req.params,
            )
            .await?;
            return Ok(Err(xml));
        }
        if what == "$access-preview" && rtype == "Patient" {
            let p = interaction::circle::access_preview(
                &req.gate,
                &state.store,
                state.config.consent_default,
                &state.insurers,
                &id,
                &req.params,
            )
            .await?;
            return Ok(Ok(FhirResponse::new(StatusCode::OK).with_value(p)));
        }
        let mut r = req.gate.reader().await?;
        let b = if what == "$everything" && rtype == "Patient" {
            interaction::everything(&mut r.view(), &state.env, &id, &req.params).await?
        } else if what.starts_with('$') {
            return Err(Error::NotSupported(format!(
                "operation {what} is not supported on {rtype}"
            )));
        } else {
            interaction::compartment_search(
                &mut r.view(),
                &state.env,
                (&rtype, &id),
                &what,
                &req.params,
                req.strict_handling(),
            )
            .await?
        };
        Ok(Ok(FhirResponse::new(StatusCode::OK).with_bundle(b)))
    };
    match result.await {
        // A signed document goes out byte for byte as signed.
        Ok(Err(xml)) => {
            crate::metrics::exchange_document("out", "sent");
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/fhir+xml; charset=utf-8")],
                xml,
            )
                .into_response()
        }
        Ok(Ok(r)) => req.respond(Ok(r)),
        Err(e) => {
            if what == "$signed-document" {
                crate::metrics::exchange_document("out", "refused");
            }
            req.respond(Err(e))
        }
    }
}

/// `POST /{type}/{id}/$operation`: `Patient/{id}/$emergency-access`
/// (break the glass), `Task/{id}/$approve` and `Task/{id}/$reject`
/// (amendments and correction requests), `Patient/{id}/$correction-request`.
pub async fn instance_operation(
    State(state): State<AppState>,
    Path((rtype, id, what)): Path<(String, String, String)>,
    req: FhirRequest,
) -> Response {
    let result = async {
        if what == "$emergency-access" && rtype == "Patient" {
            let body = req.resource()?;
            let p = interaction::circle::emergency_access(
                &req.gate,
                &state.store,
                state.config.emergency_access_minutes,
                &id,
                &body,
            )
            .await?;
            // Recorded for the patient before the answer leaves, with
            // purpose of use BTG (which `$access-log` marks).
            crate::audit::context::set_purpose("BTG");
            if let Some(log) = &state.audit {
                if let Some(e) = crate::audit::context::event(
                    crate::audit::EventType::break_the_glass(),
                    crate::audit::Action::Execute,
                ) {
                    log.record(vec![e
                        .patient(Some(id.clone()))
                        .data(format!("Patient/{id}"))])
                        .await
                        .map_err(|e| Error::AuditUnavailable(e.to_string()))?;
                }
            }
            return Ok(FhirResponse::new(StatusCode::OK).with_value(p));
        }
        interaction::check_type(&rtype)?;
        let body = if req.body.is_empty() {
            None
        } else {
            Some(req.resource()?)
        };
        let mut tx = req.gate.begin().await?;
        let w = match (rtype.as_str(), what.as_str()) {
            ("Task", "$approve") => {
                let note = interaction::amend::parameter(body.as_ref(), "comment");
                interaction::amend::approve(&mut tx, &id, note.as_deref()).await?
            }
            ("Task", "$reject") => {
                let reason = interaction::amend::parameter(body.as_ref(), "reason");
                interaction::amend::reject(&mut tx, &id, reason.as_deref().unwrap_or("")).await?
            }
            ("Patient", "$correction-request") => {
                let body = body.ok_or_else(|| {
                    Error::invalid("$correction-request takes a Communication in its body")
                })?;
                interaction::correction::request(&mut tx, &id, body).await?
            }
            _ => {
                return Err(Error::NotSupported(format!(
                    "operation POST {what} is not supported on {rtype}"
                )))
            }
        };
        tx.commit().await?;
        Ok(written(&state, &req, w))
    };
    req.respond(result.await)
}

pub async fn transaction(State(state): State<AppState>, req: FhirRequest) -> Response {
    let result = async {
        let b = req.resource()?;
        if b.get("resourceType").and_then(|v| v.as_str()) != Some("Bundle") {
            return Err(Error::invalid_at(
                "POST to the base URL takes a batch or transaction Bundle",
                "resourceType",
            ));
        }
        let response = bundle::process(&req.gate, &state.env, b).await?;
        Ok(FhirResponse::new(StatusCode::OK).with_value(response))
    };
    req.respond(result.await)
}

/// `POST /exchange/documents`: a signed XML document from a subscriber.
pub async fn exchange_document(
    State(state): State<AppState>,
    client: Option<axum::Extension<crate::exchange::tls::ClientCertificate>>,
    req: FhirRequest,
) -> Response {
    let result = async {
        let exchange = state.exchange().await?;
        let client_cert = client.as_ref().and_then(|c| c.0 .0.as_deref());
        let receipt = crate::exchange::inbound::receive(
            &state.store,
            &state.env,
            &exchange,
            &req.body,
            client_cert,
        )
        .await?;
        let status = if receipt.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(FhirResponse::new(status).with_value(receipt.body))
    };
    let result = result.await;
    crate::metrics::exchange_document(
        "in",
        if result.is_ok() {
            "accepted"
        } else {
            "refused"
        },
    );
    req.respond(result)
}

pub async fn not_found(req: FhirRequest) -> Response {
    req.respond(Err(Error::NotFound("no FHIR endpoint at this URL".into())))
}

pub async fn method_not_allowed(req: FhirRequest) -> Response {
    let m = req.method.clone();
    req.respond(Err(Error::MethodNotAllowed(format!(
        "{m} is not allowed on this URL"
    ))))
}
