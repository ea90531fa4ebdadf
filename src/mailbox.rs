//! RFC 5321 mailboxes with their ESMTP parameters, in the REST JSON shape
//! `{"m": "alice@example.com", "e": [{"k": "SIZE", "p": "100"}]}`.

use serde::{Deserialize, Serialize};

/// One ESMTP parameter of MAIL or RCPT (`SIZE=100`, `SMTPUTF8`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EsmtpParam {
    #[serde(rename = "k")]
    pub keyword: String,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl EsmtpParam {
    pub fn new(keyword: impl Into<String>, value: Option<String>) -> Self {
        // An empty value is the same as no value on the wire.
        let value = value.filter(|v| !v.is_empty());
        EsmtpParam {
            keyword: keyword.into(),
            value,
        }
    }
}

/// An envelope address. `mailbox` is empty for the null reverse path `<>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mailbox {
    #[serde(rename = "m")]
    pub mailbox: String,
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    pub esmtp: Vec<EsmtpParam>,
}

impl Mailbox {
    pub fn new(mailbox: impl Into<String>) -> Self {
        Mailbox {
            mailbox: mailbox.into(),
            esmtp: Vec::new(),
        }
    }

    pub fn with_params(mut self, esmtp: Vec<EsmtpParam>) -> Self {
        self.esmtp = esmtp;
        self
    }

    /// True for the null reverse path `<>`.
    pub fn is_null(&self) -> bool {
        self.mailbox.is_empty()
    }

    /// The domain part, if any.
    pub fn domain(&self) -> Option<&str> {
        self.mailbox.rsplit_once('@').map(|(_, d)| d)
    }

    pub fn param(&self, keyword: &str) -> Option<&EsmtpParam> {
        self.esmtp
            .iter()
            .find(|p| p.keyword.eq_ignore_ascii_case(keyword))
    }
}

/// Equality compares only the address: the parameters do not identify a recipient.
impl PartialEq for Mailbox {
    fn eq(&self, other: &Self) -> bool {
        self.mailbox == other.mailbox
    }
}
impl Eq for Mailbox {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let m = Mailbox::new("alice@example.com").with_params(vec![
            EsmtpParam::new("SIZE", Some("100".into())),
            EsmtpParam::new("SMTPUTF8", Some(String::new())),
        ]);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"m":"alice@example.com","e":[{"k":"SIZE","p":"100"},{"k":"SMTPUTF8"}]}"#
        );
        assert_eq!(
            serde_json::to_string(&Mailbox::new("")).unwrap(),
            r#"{"m":""}"#
        );
        let back: Mailbox =
            serde_json::from_str(r#"{"m":"bob","e":[{"k":"BODY","p":"8BITMIME"}]}"#).unwrap();
        assert_eq!(
            back.param("body").unwrap().value.as_deref(),
            Some("8BITMIME")
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(serde_json::from_str::<Mailbox>(r#"{"e":[]}"#).is_err());
        assert!(serde_json::from_str::<Mailbox>(r#"{"m":"a","e":[{"p":"x"}]}"#).is_err());
        assert!(serde_json::from_str::<Mailbox>(r#""alice""#).is_err());
        assert!(serde_json::from_str::<Mailbox>(r#"{"m":"a","x":1}"#).is_err());
    }

    #[test]
    fn equality_ignores_params() {
        let a = Mailbox::new("a@b").with_params(vec![EsmtpParam::new("SIZE", Some("1".into()))]);
        assert_eq!(a, Mailbox::new("a@b"));
        assert_eq!(a.domain(), Some("b"));
        assert!(Mailbox::new("").is_null());
    }
}
