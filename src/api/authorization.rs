//! HTTP endpoints of the SMART authorization server (`crate::auth` holds
//! its logic and tables), and the one place where [`AuthError`]s become
//! OAuth error responses.

mod pages;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use base64::Engine as _;
use serde_json::{json, Value};

use super::AppState;
use crate::auth::clients::{self, Client, Credentials};
use crate::auth::token::{self, Grant};
use crate::auth::users::{self, User};
use crate::auth::{
    mint_launch, now, random_token, secret_eq, sha256_b64, AuthError, AuthResult, CODE_TTL,
};
use crate::policy::scope::{self, Context, Scope};
use crate::policy::{Access, Maintenance};
use crate::store::auth as db;

const SESSION_COOKIE: &str = "ehrx_session";
type Params = Vec<(String, String)>;

/// The authorization server's routes (public: no bearer token needed).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/auth/jwks", get(jwks))
        .route("/auth/smart-style.json", get(smart_style))
        .route("/auth/authorize", get(authorize_get).post(authorize_post))
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/auth/signup", get(signup_form).post(signup))
        .route("/auth/consent", post(consent))
        .route("/auth/token", post(token_endpoint))
        .route("/auth/introspect", post(introspect))
        .route("/auth/revoke", post(revoke))
        .route("/auth/launch", post(launch))
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = match &self {
            AuthError::InvalidClient(_) | AuthError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            AuthError::Key(_) | AuthError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AuthError::AccessDenied(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        if status.is_client_error() {
            crate::metrics::auth_failure("oauth", self.code());
        }
        let description = match &self {
            AuthError::Store(e) => {
                tracing::error!("authorization server storage error: {e}");
                "internal storage error".to_string()
            }
            AuthError::Key(e) => {
                tracing::error!("authorization server key error: {e}");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let mut r = (
            status,
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({"error": self.code(), "error_description": description})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"ehrx\""),
            );
        }
        r
    }
}

pub const SCOPES_SUPPORTED: &[&str] = &[
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.rs",
    "patient/*.read",
    "patient/*.write",
    "user/*.cruds",
    "user/*.rs",
    "user/*.read",
    "user/*.write",
    "system/*.cruds",
    "system/*.rs",
    "system/*.read",
];

/// `/.well-known/smart-configuration` (SMART App Launch 2.x §2.4).
pub fn smart_configuration_document(base: &str) -> Value {
    json!({
        "issuer": base,
        "jwks_uri": format!("{base}/auth/jwks"),
        "authorization_endpoint": format!("{base}/auth/authorize"),
        "token_endpoint": format!("{base}/auth/token"),
        "introspection_endpoint": format!("{base}/auth/introspect"),
        "revocation_endpoint": format!("{base}/auth/revoke"),
        "management_endpoint": format!("{base}/auth/logout"),
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-ehr", "launch-standalone", "authorize-post",
            "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "sso-openid-connect",
            "context-ehr-patient", "context-ehr-encounter", "context-standalone-patient",
            "permission-offline", "permission-online", "permission-patient", "permission-user",
            "permission-v1", "permission-v2"
        ]
    })
}

async fn smart_configuration(State(s): State<AppState>) -> Response {
    Json(smart_configuration_document(&s.env.base)).into_response()
}

async fn openid_configuration(State(s): State<AppState>) -> Response {
    let base = &s.env.base;
    Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/auth/authorize"),
        "token_endpoint": format!("{base}/auth/token"),
        "jwks_uri": format!("{base}/auth/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser", "profile"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"]
    }))
    .into_response()
}

async fn jwks(State(s): State<AppState>) -> Response {
    match s.auth.keys.jwks(&s.store).await {
        Ok(k) => Json(k).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn smart_style() -> Response {
    Json(json!({
        "color_background": "#ffffff",
        "color_error": "#a00000",
        "color_highlight": "#1a5fb4",
        "color_modal_backdrop": "",
        "color_success": "#26a269",
        "color_text": "#1e1e1e",
        "dim_border_radius": "4px",
        "dim_font_size": "16px",
        "dim_spacing_size": "16px",
        "font_family_body": "system-ui, sans-serif",
        "font_family_heading": "system-ui, sans-serif"
    }))
    .into_response()
}

fn field<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// The OAuth parameters of an authorization request, carried through the
/// login and consent forms.
const AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "aud",
    "code_challenge",
    "code_challenge_method",
    "launch",
    "nonce",
];

fn carried(p: &[(String, String)]) -> Params {
    p.iter()
        .filter(|(k, _)| AUTHORIZE_PARAMS.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// The pages' Content-Security-Policy: nothing but inline style, forms
/// only to this server, no framing.
const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'";

fn html(status: StatusCode, body: String) -> Response {
    html_with_form_target(status, body, None)
}

/// A page whose forms may also lead to `form_target`, an origin: browsers
/// apply `form-action` to the redirects that follow a form submission, so
/// the consent page names the origin of the redirect URI its form ends at.
fn html_with_form_target(status: StatusCode, body: String, form_target: Option<&str>) -> Response {
    let csp = match form_target {
        Some(origin) => header::HeaderValue::from_str(&CSP.replace(
            "form-action 'self'",
            &format!("form-action 'self' {origin}"),
        ))
        // Not a header value (never so for what `origin_of` returns): the
        // strict policy, under which the browser stops at the redirect.
        .unwrap_or(header::HeaderValue::from_static(CSP)),
        None => header::HeaderValue::from_static(CSP),
    };
    (
        status,
        [
            (
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            ),
            (
                header::X_FRAME_OPTIONS,
                header::HeaderValue::from_static("DENY"),
            ),
            (header::CONTENT_SECURITY_POLICY, csp),
        ],
        Html(body),
    )
        .into_response()
}

/// A checked authorization request.
struct Authorization {
    client: Client,
    redirect_uri: String,
    state: Option<String>,
    /// What may be granted: the request narrowed to the client's
    /// registration and to what this kind of user may hold.
    grantable: Vec<Scope>,
    challenge: String,
    nonce: Option<String>,
    launch_patient: Option<String>,
    launch_encounter: Option<String>,
}

/// Where an error goes: to the client (redirect) once its redirect URI is
/// known to be registered, else shown to the user.
enum Refusal {
    Page(StatusCode, String),
    Redirect(String),
}

impl Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Page(status, msg) => html(status, pages::error(&msg)),
            Refusal::Redirect(to) => Redirect::to(&to).into_response(),
        }
    }
}

fn with_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish();
    format!("{uri}{}{q}", if uri.contains('?') { '&' } else { '?' })
}

async fn check_authorization(
    s: &AppState,
    p: &[(String, String)],
    user: Option<&User>,
) -> Result<Authorization, Refusal> {
    let page = |m: String| Refusal::Page(StatusCode::BAD_REQUEST, m);
    let client_id = field(p, "client_id").ok_or_else(|| page("client_id is missing".into()))?;
    let client = clients::get(&s.store, client_id)
        .await
        .map_err(|e| Refusal::Page(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .ok_or_else(|| page(format!("unknown client '{client_id}'")))?;
    let redirect_uri =
        field(p, "redirect_uri").ok_or_else(|| page("redirect_uri is missing".into()))?;
    if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
        return Err(page(format!(
            "redirect_uri '{redirect_uri}' is not registered for this client"
        )));
    }
    let state = field(p, "state").map(str::to_string);
    let fail = |code: &str, desc: String| {
        let mut q = vec![("error", code), ("error_description", desc.as_str())];
        if let Some(st) = &state {
            q.push(("state", st));
        }
        Refusal::Redirect(with_query(redirect_uri, &q))
    };
    if field(p, "response_type") != Some("code") {
        return Err(fail(
            "unsupported_response_type",
            "response_type must be code".into(),
        ));
    }
    let aud = field(p, "aud").unwrap_or("");
    if aud.trim_end_matches('/') != s.env.base {
        return Err(fail(
            "invalid_request",
            format!("aud must be this server's FHIR base URL {}", s.env.base),
        ));
    }
    if field(p, "code_challenge_method") != Some("S256") {
        return Err(fail(
            "invalid_request",
            "PKCE is required: code_challenge_method must be S256".into(),
        ));
    }
    let challenge = field(p, "code_challenge").unwrap_or("");
    if challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(fail(
            "invalid_request",
            "code_challenge must be a base64url SHA-256 (43 characters)".into(),
        ));
    }
    let requested = scope::parse_scopes(field(p, "scope").unwrap_or(""))
        .map_err(|e| fail("invalid_scope", e.to_string()))?;
    let mut grantable = scope::narrow(&requested, &client.scopes);
    // People never get system scopes; patients only see through patient/.
    grantable.retain(|sc| match sc {
        Scope::Resource(r) => {
            crate::policy::grantable_filter(r.rtype.as_deref(), &r.filter)
                && match r.context {
                    Context::System => false,
                    Context::User => !user.is_some_and(User::is_patient),
                    Context::Patient => true,
                }
        }
        _ => true,
    });
    let (mut launch_patient, mut launch_encounter) = (None, None);
    if let Some(launch) = field(p, "launch") {
        let mut conn = s
            .store
            .reader()
            .await
            .map_err(|e| Refusal::Page(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let row = db::launch(&mut conn, launch, now())
            .await
            .map_err(|e| Refusal::Page(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let row = row.ok_or_else(|| fail("invalid_request", "unknown or expired launch".into()))?;
        launch_patient = row.patient;
        launch_encounter = row.encounter;
    } else if requested.contains(&Scope::Launch) {
        return Err(fail(
            "invalid_request",
            "scope launch needs a launch parameter".into(),
        ));
    }
    Ok(Authorization {
        client,
        redirect_uri: redirect_uri.to_string(),
        state,
        grantable,
        challenge: challenge.to_string(),
        nonce: field(p, "nonce").map(str::to_string),
        launch_patient,
        launch_encounter,
    })
}

async fn session(s: &AppState, jar: &CookieJar) -> AuthResult<Option<(User, String)>> {
    match jar.get(SESSION_COOKIE) {
        Some(c) => Ok(users::session_user(&s.store, c.value())
            .await?
            .map(|u| (u, c.value().to_string()))),
        None => Ok(None),
    }
}

fn csrf(session: &str) -> String {
    sha256_b64(&format!("csrf:{session}"))
}

fn meaning(sc: &Scope) -> String {
    match sc {
        Scope::OpenId | Scope::Profile => "Know who you are".into(),
        Scope::FhirUser => "See your user record".into(),
        Scope::Launch | Scope::LaunchPatient => "Know which patient is in context".into(),
        Scope::LaunchEncounter => "Know which encounter is in context".into(),
        Scope::OfflineAccess => "Keep access after you sign out".into(),
        Scope::OnlineAccess => "Keep access while you are signed in".into(),
        Scope::Resource(r) => {
            let what = r.rtype.as_deref().unwrap_or("all record types");
            let mut verbs = Vec::new();
            for (op, v) in [
                (scope::Ops::READ, "read"),
                (scope::Ops::SEARCH, "search"),
                (scope::Ops::CREATE, "create"),
                (scope::Ops::UPDATE, "change"),
                (scope::Ops::DELETE, "delete"),
            ] {
                if r.ops.contains(op) {
                    verbs.push(v);
                }
            }
            let whose = match r.context {
                Context::Patient => "of the patient",
                Context::User => "you can see",
                Context::System => "",
            };
            format!("{} {what} {whose}", capitalise(&verbs.join(", ")))
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Whether the user must pick a patient on the consent page.
fn needs_picker(a: &Authorization, user: &User) -> bool {
    a.launch_patient.is_none() && !user.is_patient() && a.grantable.contains(&Scope::LaunchPatient)
}

/// The store as the signing-in user may read patients: a practitioner
/// picks only among the patients of their circle of trust.
async fn picker_gate(s: &AppState, user: &User) -> Option<crate::store::Gate> {
    let role = crate::policy::Role::of_token(Some(&user.fhir_user), None, None);
    let scopes = scope::parse_scopes("user/Patient.rs").ok()?;
    let access = Access::from_token(&scopes, None, role);
    let access = super::request::with_circle(s, access).await.ok()?;
    Some(s.store.gate(access))
}

async fn patient_choices(s: &AppState, user: &User) -> Vec<(String, String)> {
    let Some(gate) = picker_gate(s, user).await else {
        return Vec::new();
    };
    let Ok(mut r) = gate.reader().await else {
        return Vec::new();
    };
    let params = vec![
        ("_count".to_string(), "50".to_string()),
        ("_sort".to_string(), "family".to_string()),
    ];
    let Ok(Ok(bundle)) =
        crate::interaction::search(&mut r.view(), &s.env, "Patient", &params, false)
            .await
            .map(|b| b.into_value())
    else {
        return Vec::new();
    };
    bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter_map(|e| {
                    let r = &e["resource"];
                    let id = r["id"].as_str()?.to_string();
                    let n = &r["name"][0];
                    let given = n["given"][0].as_str().unwrap_or("");
                    let family = n["family"].as_str().unwrap_or("");
                    Some((id, format!("{given} {family}").trim().to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn authorize(s: AppState, jar: CookieJar, p: Params) -> Response {
    let user = match session(&s, &jar).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let a = match check_authorization(&s, &p, user.as_ref().map(|(u, _)| u)).await {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let Some((user, sid)) = user else {
        return html(StatusCode::OK, pages::login(&carried(&p), None));
    };
    render_consent(&s, &a, &user, &sid, &p, None).await
}

async fn render_consent(
    s: &AppState,
    a: &Authorization,
    user: &User,
    sid: &str,
    p: &[(String, String)],
    error: Option<&str>,
) -> Response {
    let choices: Vec<pages::Choice> = a
        .grantable
        .iter()
        .map(|sc| pages::Choice {
            scope: sc.to_string(),
            meaning: meaning(sc),
        })
        .collect();
    let patients = if needs_picker(a, user) {
        Some(patient_choices(s, user).await)
    } else {
        None
    };
    let mut hidden = carried(p);
    hidden.push(("csrf".into(), csrf(sid)));
    let redirect_origin = clients::origin_of(&a.redirect_uri);
    html_with_form_target(
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        pages::consent(
            &a.client.name,
            &user.username,
            &hidden,
            &choices,
            patients.as_deref(),
            error,
        ),
        redirect_origin.as_deref(),
    )
}

async fn authorize_get(
    State(s): State<AppState>,
    jar: CookieJar,
    Query(p): Query<Params>,
) -> Response {
    authorize(s, jar, p).await
}

async fn authorize_post(
    State(s): State<AppState>,
    jar: CookieJar,
    Form(p): Form<Params>,
) -> Response {
    authorize(s, jar, p).await
}

fn secure_cookie(s: &AppState, value: String) -> Cookie<'static> {
    Cookie::build((SESSION_COOKIE, value))
        .path("/auth")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(s.env.base.starts_with("https://"))
        .build()
}

fn back_to_authorize(p: &[(String, String)]) -> Response {
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(carried(p).iter())
        .finish();
    Redirect::to(&format!("/auth/authorize?{q}")).into_response()
}

async fn login(State(s): State<AppState>, jar: CookieJar, Form(p): Form<Params>) -> Response {
    let (Some(username), Some(password)) = (field(&p, "username"), field(&p, "password")) else {
        return html(
            StatusCode::BAD_REQUEST,
            pages::login(&carried(&p), Some("Enter your username and password.")),
        );
    };
    if let Err(wait) = s.throttle.login(username) {
        tracing::warn!("sign-in attempts throttled for one account");
        let mut r = html(
            StatusCode::TOO_MANY_REQUESTS,
            pages::login(
                &carried(&p),
                Some("Too many sign-in attempts for this account. Wait a minute and try again."),
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, retry_after(wait));
        return r;
    }
    match users::login(&s.store, username, password).await {
        Ok(Some(user)) => match users::start_session(&s.store, &user.id).await {
            Ok(sid) => {
                tracing::info!(user = %user.id, "login");
                (jar.add(secure_cookie(&s, sid)), back_to_authorize(&p)).into_response()
            }
            Err(e) => e.into_response(),
        },
        Ok(None) => {
            tracing::info!("login failed");
            html(
                StatusCode::UNAUTHORIZED,
                pages::login(&carried(&p), Some("The username or password is not right.")),
            )
        }
        Err(e) => e.into_response(),
    }
}

async fn logout(State(s): State<AppState>, jar: CookieJar) -> Response {
    if let Some(c) = jar.get(SESSION_COOKIE) {
        if let Err(e) = users::end_session(&s.store, c.value()).await {
            return e.into_response();
        }
    }
    (
        jar.remove(Cookie::build(SESSION_COOKIE).path("/auth")),
        html(
            StatusCode::OK,
            pages::page("Signed out", "<p>You are signed out.</p>"),
        ),
    )
        .into_response()
}

async fn signup_form(Query(p): Query<Params>) -> Response {
    html(StatusCode::OK, pages::signup(&carried(&p), None))
}

/// Patient self-registration: a Patient resource and a user bound to it.
async fn signup(State(s): State<AppState>, jar: CookieJar, Form(p): Form<Params>) -> Response {
    let get = |k: &str| field(&p, k).map(str::trim).unwrap_or("");
    let (given, family, birth, email, password) = (
        get("given"),
        get("family"),
        get("birthDate"),
        get("email"),
        field(&p, "password").unwrap_or(""),
    );
    let again = |msg: &str| {
        html(
            StatusCode::BAD_REQUEST,
            pages::signup(&carried(&p), Some(msg)),
        )
    };
    if given.is_empty() || family.is_empty() || birth.is_empty() {
        return again("Enter your given name, family name and date of birth.");
    }
    if !email.contains('@') {
        return again("Enter a valid email address.");
    }
    if let Err(e) = users::check_password(password) {
        return again(&e.to_string());
    }
    let patient = json!({
        "resourceType": "Patient",
        "name": [{"family": family, "given": [given]}],
        "birthDate": birth,
        "telecom": [{"system": "email", "value": email}]
    });
    // The Patient and the user are written together, or neither is.
    let internal = |e: &dyn std::fmt::Display| {
        tracing::error!("sign-up failed: {e}");
        "The account could not be created; try again later.".to_string()
    };
    let created = async {
        let gate = s.store.gate(Access::maintenance(Maintenance::SignUp));
        let mut tx = gate.begin().await.map_err(|e| internal(&e))?;
        let w = crate::interaction::create(&mut tx, "Patient", patient, None)
            .await
            .map_err(|e| match e {
                crate::error::Error::Store(se) => internal(&se),
                other => other.to_string(),
            })?;
        let user = users::add_in(
            tx.own_tables(),
            email,
            password,
            &format!("Patient/{}", w.id),
        )
        .await
        .map_err(|e| match e {
            AuthError::InvalidRequest(m) => m,
            other => internal(&other),
        })?;
        tx.commit().await.map_err(|e| internal(&e))?;
        Ok::<_, String>(user)
    }
    .await;
    let user = match created {
        Ok(u) => u,
        Err(e) => return again(&e),
    };
    tracing::info!(user = %user.id, "patient signed up");
    match users::start_session(&s.store, &user.id).await {
        Ok(sid) => (jar.add(secure_cookie(&s, sid)), back_to_authorize(&p)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn consent(State(s): State<AppState>, jar: CookieJar, Form(p): Form<Params>) -> Response {
    let (user, sid) = match session(&s, &jar).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            return html(
                StatusCode::UNAUTHORIZED,
                pages::login(&carried(&p), Some("Your session has ended; sign in again.")),
            )
        }
        Err(e) => return e.into_response(),
    };
    if !secret_eq(field(&p, "csrf").unwrap_or(""), &csrf(&sid)) {
        return html(
            StatusCode::FORBIDDEN,
            pages::error("The form is out of date; start again from the app."),
        );
    }
    let a = match check_authorization(&s, &p, Some(&user)).await {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let state = a.state.clone();
    let redirect = |pairs: &[(&str, &str)]| {
        let mut q: Vec<(&str, &str)> = pairs.to_vec();
        if let Some(st) = &state {
            q.push(("state", st));
        }
        Redirect::to(&with_query(&a.redirect_uri, &q)).into_response()
    };
    if field(&p, "decision") != Some("allow") {
        return redirect(&[
            ("error", "access_denied"),
            ("error_description", "the user denied access"),
        ]);
    }
    let chosen: Vec<&str> = p
        .iter()
        .filter(|(k, _)| k == "grant")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut granted: Vec<Scope> = a
        .grantable
        .iter()
        .filter(|sc| chosen.contains(&sc.to_string().as_str()))
        .cloned()
        .collect();
    // The patient in context: from the EHR launch, the patient user, or
    // the practitioner's choice.
    let patient = if let Some(pid) = &a.launch_patient {
        Some(pid.clone())
    } else if let Some(pid) = user.patient_id() {
        Some(pid.to_string())
    } else if needs_picker(&a, &user) && granted.contains(&Scope::LaunchPatient) {
        let Some(pid) = field(&p, "patient").filter(|v| !v.is_empty()) else {
            return render_consent(&s, &a, &user, &sid, &p, Some("Choose a patient.")).await;
        };
        let exists = match picker_gate(&s, &user).await {
            Some(gate) => match gate.reader().await {
                Ok(mut r) => crate::interaction::read(&mut r.view(), "Patient", pid)
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            None => false,
        };
        if !exists {
            return render_consent(
                &s,
                &a,
                &user,
                &sid,
                &p,
                Some("That patient does not exist."),
            )
            .await;
        }
        Some(pid.to_string())
    } else {
        None
    };
    if patient.is_none() {
        granted.retain(|sc| !matches!(sc, Scope::Resource(r) if r.context == Context::Patient));
    }
    let code = random_token();
    let stored = async {
        let mut tx = s.store.begin().await?;
        let row = db::CodeRow {
            client_id: a.client.client_id.clone(),
            user_id: user.id.clone(),
            redirect_uri: a.redirect_uri.clone(),
            scope: scope::join(&granted),
            challenge: a.challenge.clone(),
            patient: patient.clone(),
            encounter: a.launch_encounter.clone(),
            nonce: a.nonce.clone(),
            expires: now() + CODE_TTL,
        };
        db::insert_code(tx.conn(), &sha256_b64(&code), &row).await?;
        tx.commit().await?;
        Ok::<_, crate::store::StoreError>(())
    }
    .await;
    if let Err(e) = stored {
        return AuthError::Store(e).into_response();
    }
    tracing::info!(client = %a.client.client_id, user = %user.id, "authorization code issued");
    redirect(&[("code", &code)])
}

fn token_json(body: Value) -> Response {
    (
        StatusCode::OK,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        Json(body),
    )
        .into_response()
}

async fn token_endpoint(
    State(s): State<AppState>,
    headers: HeaderMap,
    Form(p): Form<Params>,
) -> Response {
    if let Err(wait) = s.throttle.token(&throttle_key(&headers, &p)) {
        tracing::warn!("token requests throttled for one client");
        let body = json!({
            "error": "temporarily_unavailable",
            "error_description": "too many token requests for this client; retry later",
        });
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, retry_after(wait)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            Json(body),
        )
            .into_response();
    }
    match token_grant(&s, &headers, &p).await {
        Ok(body) => token_json(body),
        Err(e) => e.into_response(),
    }
}

/// Whole seconds to wait, at least one.
fn retry_after(wait: std::time::Duration) -> HeaderValue {
    HeaderValue::from(wait.as_secs().max(1))
}

/// The client a token request claims to come from, before it is
/// authenticated: `client_id`, the Basic user, or the assertion's `iss`.
fn throttle_key(headers: &HeaderMap, p: &[(String, String)]) -> String {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Ok(c) = Credentials::from_request(basic, p) {
        if let Some(id) = c.client_id {
            return id;
        }
    }
    field(p, "client_assertion")
        .and_then(|jwt| jwt.split('.').nth(1))
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|claims| {
            claims
                .get("iss")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default()
}

async fn token_grant(
    s: &AppState,
    headers: &HeaderMap,
    p: &[(String, String)],
) -> AuthResult<Value> {
    let creds = Credentials::from_request(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        p,
    )?;
    let need =
        |k: &str| field(p, k).ok_or_else(|| AuthError::InvalidRequest(format!("{k} is missing")));
    match field(p, "grant_type") {
        Some("authorization_code") => {
            let client = clients::authenticate(&s.auth, &creds, true).await?;
            let code = need("code")?;
            let verifier = need("code_verifier")?;
            let redirect_uri = need("redirect_uri")?;
            let code_hash = sha256_b64(code);
            let mut tx = s.store.begin().await?;
            let row = db::code(tx.conn(), &code_hash).await?;
            let row =
                row.ok_or_else(|| AuthError::InvalidGrant("unknown authorization code".into()))?;
            db::lock_grant(&mut tx, &code_hash).await?;
            // Single use by compare-and-set: of concurrent redemptions, the
            // one whose update finds the code unused wins.
            let won = db::use_code(tx.conn(), &code_hash).await?;
            if !won {
                // A replayed code: whoever holds it, the grant is burnt.
                token::revoke_grant(&mut tx, &code_hash).await?;
                tx.commit().await?;
                token::revoked(&s.auth).await;
                tracing::warn!(client = %client.client_id, "authorization code replayed; its tokens are revoked");
                return Err(AuthError::InvalidGrant(
                    "the authorization code was already used".into(),
                ));
            }
            tx.commit().await?;
            if row.expires < now() {
                return Err(AuthError::InvalidGrant(
                    "the authorization code has expired".into(),
                ));
            }
            if row.client_id != client.client_id {
                return Err(AuthError::InvalidGrant(
                    "the code was issued to another client".into(),
                ));
            }
            if row.redirect_uri != redirect_uri {
                return Err(AuthError::InvalidGrant(
                    "redirect_uri differs from the authorization request".into(),
                ));
            }
            if !secret_eq(&sha256_b64(verifier), &row.challenge) {
                return Err(AuthError::InvalidGrant(
                    "code_verifier does not match the code_challenge".into(),
                ));
            }
            let user = users::get(&s.store, &row.user_id)
                .await?
                .ok_or_else(|| AuthError::InvalidGrant("the user no longer exists".into()))?;
            let scopes = scope::parse_scopes(&row.scope)?;
            let refresh =
                scopes.contains(&Scope::OfflineAccess) || scopes.contains(&Scope::OnlineAccess);
            let grant = Grant {
                grant_id: code_hash,
                client_id: client.client_id.clone(),
                user_id: Some(user.id.clone()),
                fhir_user: Some(user.fhir_user.clone()),
                organization: None,
                insurer_role: None,
                patient: row.patient,
                encounter: row.encounter,
                nonce: row.nonce,
                scopes,
                refresh,
            };
            tracing::info!(client = %client.client_id, user = %user.id, "token issued (authorization_code)");
            token::issue(&s.auth, &grant).await
        }
        Some("refresh_token") => {
            let client = clients::authenticate(&s.auth, &creds, true).await?;
            let presented = need("refresh_token")?;
            let id = sha256_b64(presented);
            let mut tx = s.store.begin().await?;
            let stored = token::find(tx.conn(), &id)
                .await?
                .filter(|t| t.kind == "refresh")
                .ok_or_else(|| AuthError::InvalidGrant("unknown refresh token".into()))?;
            if stored.client_id != client.client_id {
                return Err(AuthError::InvalidGrant(
                    "the refresh token was issued to another client".into(),
                ));
            }
            if stored.revoked || stored.expires < now() {
                return Err(AuthError::InvalidGrant(
                    "the refresh token is no longer valid".into(),
                ));
            }
            // Single use by compare-and-set, as for codes.
            db::lock_grant(&mut tx, &stored.grant_id).await?;
            let won = db::use_token(tx.conn(), &id).await?;
            if !won {
                token::revoke_grant(&mut tx, &stored.grant_id).await?;
                tx.commit().await?;
                token::revoked(&s.auth).await;
                tracing::warn!(client = %client.client_id, "refresh token replayed; its grant is revoked");
                return Err(AuthError::InvalidGrant(
                    "the refresh token was already used".into(),
                ));
            }
            tx.commit().await?;
            let held = scope::parse_scopes(&stored.scope)?;
            let scopes = match field(p, "scope") {
                Some(asked) => {
                    let asked = scope::parse_scopes(asked)?;
                    let n = scope::narrow(&asked, &held);
                    if n.len() != asked.len() {
                        return Err(AuthError::InvalidScope(
                            "a refresh may only narrow the granted scopes".into(),
                        ));
                    }
                    n
                }
                None => held,
            };
            let grant = Grant {
                grant_id: stored.grant_id,
                client_id: client.client_id,
                user_id: stored.user_id,
                fhir_user: stored.fhir_user,
                organization: None,
                insurer_role: None,
                patient: stored.patient,
                encounter: stored.encounter,
                nonce: None,
                refresh: true,
                scopes,
            };
            token::issue(&s.auth, &grant).await
        }
        Some("client_credentials") => {
            if creds.assertion.is_none() {
                return Err(AuthError::InvalidClient(
                    "client_credentials needs a signed client_assertion (SMART Backend Services)"
                        .into(),
                ));
            }
            let client = clients::authenticate(&s.auth, &creds, false).await?;
            let asked = scope::parse_scopes(need("scope")?)?;
            if asked
                .iter()
                .any(|sc| !matches!(sc, Scope::Resource(r) if r.context == Context::System))
            {
                return Err(AuthError::InvalidScope(
                    "client_credentials grants only system/ scopes".into(),
                ));
            }
            let mut scopes = scope::narrow(&asked, &client.scopes);
            scopes.retain(|sc| matches!(sc, Scope::Resource(r) if crate::policy::grantable_filter(r.rtype.as_deref(), &r.filter)));
            if scopes.is_empty() {
                return Err(AuthError::InvalidScope(
                    "none of the requested scopes is registered for this client".into(),
                ));
            }
            let grant = Grant {
                grant_id: random_token(),
                client_id: client.client_id.clone(),
                user_id: None,
                fhir_user: None,
                organization: client.organization.clone(),
                insurer_role: client.organization.as_ref().map(|_| {
                    client
                        .insurer_role
                        .clone()
                        .unwrap_or_else(|| "claims".into())
                }),
                patient: None,
                encounter: None,
                nonce: None,
                refresh: false,
                scopes,
            };
            tracing::info!(client = %client.client_id, "token issued (client_credentials)");
            token::issue(&s.auth, &grant).await
        }
        Some(other) => Err(AuthError::UnsupportedGrantType(format!(
            "grant_type '{other}' is not supported"
        ))),
        None => Err(AuthError::InvalidRequest("grant_type is missing".into())),
    }
}

/// Introspection (RFC 7662). The caller authenticates as a confidential
/// client, or with an access token of its own.
async fn introspect(
    State(s): State<AppState>,
    headers: HeaderMap,
    Form(p): Form<Params>,
) -> Response {
    let result = async {
        let authz = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match authz.and_then(|a| a.strip_prefix("Bearer ")) {
            Some(bearer) => {
                token::verify(&s.auth, bearer.trim()).await?;
            }
            None => {
                let creds = Credentials::from_request(authz, &p)?;
                clients::authenticate(&s.auth, &creds, false).await?;
            }
        }
        let presented = field(&p, "token")
            .ok_or_else(|| AuthError::InvalidRequest("token is missing".into()))?;
        let mut conn = s.store.reader().await?;
        let stored = token::lookup(&s.auth, &mut conn, presented).await?;
        let t = now();
        Ok::<_, AuthError>(match stored {
            Some(st) if !st.revoked && st.expires > t && !(st.kind == "refresh" && st.used) => {
                let mut body = json!({
                    "active": true,
                    "scope": st.scope,
                    "client_id": st.client_id,
                    "token_type": if st.kind == "access" { "Bearer" } else { "refresh_token" },
                    "exp": st.expires,
                    "iat": st.created,
                    "iss": s.env.base,
                    "aud": s.env.base,
                    "sub": st.user_id.clone().unwrap_or_else(|| st.client_id.clone()),
                });
                if let Some(pt) = st.patient {
                    body["patient"] = json!(pt);
                }
                if let Some(e) = st.encounter {
                    body["encounter"] = json!(e);
                }
                if let Some(f) = st.fhir_user {
                    body["fhirUser"] = json!(f);
                }
                body
            }
            _ => json!({"active": false}),
        })
    }
    .await;
    match result {
        Ok(body) => token_json(body),
        Err(e) => e.into_response(),
    }
}

/// Revocation (RFC 7009): always 200 for a token the caller may revoke or
/// that does not exist; a refresh token takes its whole grant with it.
async fn revoke(State(s): State<AppState>, headers: HeaderMap, Form(p): Form<Params>) -> Response {
    let result = async {
        let creds = Credentials::from_request(
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
            &p,
        )?;
        let client = clients::authenticate(&s.auth, &creds, true).await?;
        let presented = field(&p, "token")
            .ok_or_else(|| AuthError::InvalidRequest("token is missing".into()))?;
        let mut tx = s.store.begin().await?;
        if let Some(st) = token::lookup(&s.auth, tx.conn(), presented).await? {
            if st.client_id != client.client_id {
                return Err(AuthError::UnauthorizedClient(
                    "the token was issued to another client".into(),
                ));
            }
            if st.kind == "refresh" {
                token::revoke_grant(&mut tx, &st.grant_id).await?;
            } else {
                token::revoke_access_token(&mut tx, &st.id).await?;
            }
        }
        tx.commit().await?;
        token::revoked(&s.auth).await;
        Ok::<_, AuthError>(())
    }
    .await;
    match result {
        Ok(()) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /auth/launch` `{"patient": "…", "encounter": "…"}` by an EHR user
/// (a bearer token with a `user/` scope that may read the patient).
async fn launch(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let result = async {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "))
            .ok_or_else(|| AuthError::InvalidToken("a bearer token is required".into()))?;
        let verified = token::verify(&s.auth, bearer.trim()).await?;
        super::authenticate::identify(&verified.principal.claims);
        if verified
            .principal
            .claims
            .fhir_user
            .as_deref()
            .is_none_or(|f| f.starts_with("Patient/"))
        {
            return Err(AuthError::AccessDenied(
                "only EHR users may create launch contexts".into(),
            ));
        }
        let patient = body.get("patient").and_then(Value::as_str);
        let encounter = body.get("encounter").and_then(Value::as_str);
        if let Some(pid) = patient {
            // The practitioner must see the patient now: their circle of
            // trust, read for this request.
            let access = super::request::with_circle(&s, verified.access.clone())
                .await
                .map_err(|e| AuthError::AccessDenied(e.to_string()))?;
            let gate = s.store.gate(access);
            let mut r = gate.reader().await?;
            crate::interaction::read(&mut r.view(), "Patient", pid)
                .await
                .map_err(|e| AuthError::AccessDenied(format!("Patient/{pid}: {e}")))?;
        }
        mint_launch(&s.store, patient, encounter).await
    }
    .await;
    match result {
        Ok(id) => (StatusCode::CREATED, Json(json!({"launch": id}))).into_response(),
        Err(e) => e.into_response(),
    }
}
