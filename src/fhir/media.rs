//! Media types and content negotiation (FHIR R4 http.html §2.21.0.6).

/// The two wire formats ehrx speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/fhir+json; charset=utf-8",
            Format::Xml => "application/fhir+xml; charset=utf-8",
        }
    }
}

/// Media type of a request or `_format` value, without parameters.
fn essence(media: &str) -> String {
    media
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Recognises a FHIR resource media type (`Content-Type`, `_format`).
pub fn parse_format(media: &str) -> Option<Format> {
    match essence(media).as_str() {
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir" => {
            Some(Format::Json)
        }
        "xml"
        | "text/xml"
        | "application/xml"
        | "application/fhir+xml"
        | "application/xml+fhir" => Some(Format::Xml),
        _ => None,
    }
}

/// Chooses the response format from `_format` (which wins) and `Accept`.
/// `Err` carries the unsupported value for a 406.
pub fn negotiate(format_param: Option<&str>, accept: Option<&str>) -> Result<Format, String> {
    if let Some(f) = format_param {
        return parse_format(f).ok_or_else(|| f.to_string());
    }
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Format::Json);
    };
    // Highest q wins; order breaks ties.
    let mut best: Option<(f32, Format)> = None;
    let mut any = false;
    for part in accept.split(',') {
        let mut pieces = part.split(';');
        let media = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = pieces
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        let fmt = match media.as_str() {
            "*/*" | "application/*" => {
                any = true;
                Some(Format::Json)
            }
            m => parse_format(m),
        };
        if let Some(fmt) = fmt {
            if best.map(|(bq, _)| q > bq).unwrap_or(true) {
                best = Some((q, fmt));
            }
        }
    }
    match best {
        Some((_, f)) => Ok(f),
        None if any => Ok(Format::Json),
        None => Err(accept.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(None, None), Ok(Format::Json));
        assert_eq!(
            negotiate(None, Some("application/fhir+xml")),
            Ok(Format::Xml)
        );
        assert_eq!(
            negotiate(Some("xml"), Some("application/json")),
            Ok(Format::Xml)
        );
        assert_eq!(
            negotiate(
                None,
                Some("application/fhir+json;q=0.5, application/fhir+xml")
            ),
            Ok(Format::Xml)
        );
        assert_eq!(
            negotiate(None, Some("text/html, */*;q=0.8")),
            Ok(Format::Json)
        );
        assert!(negotiate(None, Some("text/html")).is_err());
        assert!(negotiate(Some("turtle"), None).is_err());
    }
}
