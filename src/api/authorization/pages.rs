//! Server-rendered HTML for login, sign-up and consent: plain forms that
//! work without JavaScript, with one `h1` per page, a label for every
//! field, fieldsets with legends for groups, errors announced with
//! `role="alert"` and linked to their field, and a focus order that follows
//! the reading order.

use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;line-height:1.5}\
label{display:block;margin-top:1rem;font-weight:600}input[type=text],input[type=password],input[type=email],input[type=date]{width:100%;padding:.5rem;font-size:1rem}\
button{margin-top:1.5rem;margin-right:1rem;padding:.6rem 1.2rem;font-size:1rem}fieldset{margin-top:1rem}\
.error{color:#a00;border:2px solid #a00;padding:.5rem}:focus{outline:3px solid #1a5fb4;outline-offset:2px}";

/// A whole page.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} — ehrx</title><style>{STYLE}</style></head>\
         <body><main><h1>{}</h1>{body}</main></body></html>",
        text(title),
        text(title)
    )
}

/// Hidden inputs carrying request parameters through a form.
pub fn hidden(params: &[(String, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                attr(k),
                attr(v)
            )
        })
        .collect()
}

fn alert(error: Option<&str>) -> String {
    match error {
        Some(e) => format!(
            "<p class=\"error\" role=\"alert\" id=\"form-error\">{}</p>",
            text(e)
        ),
        None => String::new(),
    }
}

fn described(error: Option<&str>) -> &'static str {
    if error.is_some() {
        " aria-describedby=\"form-error\" aria-invalid=\"true\""
    } else {
        ""
    }
}

pub fn login(return_to: &[(String, String)], error: Option<&str>) -> String {
    let d = described(error);
    page(
        "Sign in",
        &format!(
            "{}<form method=\"post\" action=\"/auth/login\">{}\
             <label for=\"username\">Username or email</label>\
             <input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" required autofocus{d}>\
             <label for=\"password\">Password</label>\
             <input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required{d}>\
             <button type=\"submit\">Sign in</button></form>\
             <p>New patient? <a href=\"/auth/signup?{}\">Create an account</a>.</p>",
            alert(error),
            hidden(return_to),
            attr(&form_urlencoded::Serializer::new(String::new())
                .extend_pairs(return_to.iter())
                .finish()),
        ),
    )
}

pub fn signup(return_to: &[(String, String)], error: Option<&str>) -> String {
    let d = described(error);
    page(
        "Create a patient account",
        &format!(
            "{}<form method=\"post\" action=\"/auth/signup\">{}\
             <label for=\"given\">Given name</label>\
             <input type=\"text\" id=\"given\" name=\"given\" autocomplete=\"given-name\" required autofocus>\
             <label for=\"family\">Family name</label>\
             <input type=\"text\" id=\"family\" name=\"family\" autocomplete=\"family-name\" required>\
             <label for=\"birthDate\">Date of birth</label>\
             <input type=\"date\" id=\"birthDate\" name=\"birthDate\" autocomplete=\"bday\" required>\
             <label for=\"email\">Email</label>\
             <input type=\"email\" id=\"email\" name=\"email\" autocomplete=\"email\" required{d}>\
             <label for=\"password\">Password (at least 10 characters)</label>\
             <input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"new-password\" minlength=\"10\" required{d}>\
             <button type=\"submit\">Create account</button></form>",
            alert(error),
            hidden(return_to),
        ),
    )
}

/// One choice on the consent page.
pub struct Choice {
    pub scope: String,
    pub meaning: String,
}

pub fn consent(
    client_name: &str,
    user: &str,
    carried: &[(String, String)],
    choices: &[Choice],
    patients: Option<&[(String, String)]>,
    error: Option<&str>,
) -> String {
    let scopes: String = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "<div><input type=\"checkbox\" id=\"scope-{i}\" name=\"grant\" value=\"{}\" checked>\
                 <label for=\"scope-{i}\" style=\"display:inline;font-weight:normal\">{} <code>{}</code></label></div>",
                attr(&c.scope),
                text(&c.meaning),
                text(&c.scope)
            )
        })
        .collect();
    let picker = match patients {
        Some(list) => {
            let options: String = list
                .iter()
                .enumerate()
                .map(|(i, (id, name))| {
                    format!(
                        "<div><input type=\"radio\" id=\"patient-{i}\" name=\"patient\" value=\"{}\"{}>\
                         <label for=\"patient-{i}\" style=\"display:inline;font-weight:normal\">{} (Patient/{})</label></div>",
                        attr(id),
                        if i == 0 { " required" } else { "" },
                        text(name),
                        text(id)
                    )
                })
                .collect();
            format!(
                "<fieldset><legend>Choose the patient for this app</legend>{}</fieldset>",
                if options.is_empty() {
                    "<label for=\"patient\">Patient id</label><input type=\"text\" id=\"patient\" name=\"patient\" required>".to_string()
                } else {
                    options
                }
            )
        }
        None => String::new(),
    };
    page(
        "Allow access",
        &format!(
            "{}<p>Signed in as <strong>{}</strong>.</p>\
             <p><strong>{}</strong> asks for access. Untick anything you do not want to allow.</p>\
             <form method=\"post\" action=\"/auth/consent\">{}\
             {picker}<fieldset><legend>Permissions</legend>{scopes}</fieldset>\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            alert(error),
            text(user),
            text(client_name),
            hidden(carried),
        ),
    )
}

pub fn error(message: &str) -> String {
    page(
        "The request cannot be completed",
        &format!("<p role=\"alert\">{}</p>", text(message)),
    )
}
