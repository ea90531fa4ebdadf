//! SMTP-style responses, `{"code": 250, "message": "ok"}` on the wire.

use serde::{Deserialize, Deserializer, Serialize};

/// A response to one request of a transaction (MAIL, one RCPT, or the body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Response {
    pub code: u16,
    pub message: String,
}

impl Response {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Response {
            code,
            message: message.into(),
        }
    }

    /// The message a response gets when none was given.
    pub fn default_message(code: u16) -> &'static str {
        match code {
            200..=299 => "ok",
            400..=499 => "temporary error",
            500..=599 => "permanent error",
            _ => "internal error",
        }
    }

    pub fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
    pub fn temp(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn perm(&self) -> bool {
        (500..600).contains(&self.code)
    }
    pub fn err(&self) -> bool {
        !self.ok()
    }
    /// The major digit (2, 4, 5).
    pub fn major(&self) -> u16 {
        self.code / 100
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.message)
    }
}

// On input `code` must be an integer and `message`, if present, a string.
impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wire {
            code: u16,
            message: Option<String>,
        }
        let w = Wire::deserialize(d)?;
        let message = w
            .message
            .unwrap_or_else(|| Response::default_message(w.code).to_string());
        Ok(Response {
            code: w.code,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_messages() {
        let r: Response = serde_json::from_str(r#"{"code": 201}"#).unwrap();
        assert_eq!(r, Response::new(201, "ok"));
        let r: Response = serde_json::from_str(r#"{"code": 450}"#).unwrap();
        assert_eq!(r.message, "temporary error");
        let r: Response = serde_json::from_str(r#"{"code": 550}"#).unwrap();
        assert_eq!(r.message, "permanent error");
        let r: Response = serde_json::from_str(r#"{"code": 600}"#).unwrap();
        assert_eq!(r.message, "internal error");
    }

    #[test]
    fn rejects_string_code() {
        assert!(serde_json::from_str::<Response>(r#"{"code": "250"}"#).is_err());
        assert!(serde_json::from_str::<Response>(r#"{"code": 250, "message": 3}"#).is_err());
    }

    #[test]
    fn classification() {
        assert!(Response::new(250, "").ok());
        assert!(Response::new(451, "").temp());
        assert!(Response::new(554, "").perm());
        assert!(Response::new(554, "").err());
        assert_eq!(Response::new(554, "x").to_string(), "554 x");
        assert_eq!(
            serde_json::to_string(&Response::new(250, "ok")).unwrap(),
            r#"{"code":250,"message":"ok"}"#
        );
    }
}
