//! `http_hook`: extends the router without recompiling. Each time the transaction has
//! something new (recipients, the finished body) the filter POSTs it as JSON to `url` —
//! the REST read view with the addresses filled in (`mail_from: {"m": …}`,
//! `rcpt_to: [{"m": …}]`) — and applies what the hook answers:
//! `{"mail_response"?, "rcpt_response"?: [..], "data_response"?}`, each a response
//! `{"code", "message"}` (or null) for a request that has none yet. A request the hook
//! answers is settled: later filters leave it alone (a rejected recipient is never sent).
//!
//! YAML: `url` (required), `timeout` (seconds, default 10), `on_error: tempfail|accept`
//! (default `tempfail`: a hook that fails or times out answers open requests 451).

use std::time::Duration;

use koukan::Response;
use koukan::filter::{ChainTx, Filter, LocalFuture, Next};
use koukan::rest::render_read;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HookConfigError {
    #[error("url: missing")]
    MissingUrl,
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Error)]
enum HookError {
    #[error("request: {0}")]
    Send(String),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("answer: {0}")]
    Answer(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnError {
    TempFail,
    Accept,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpHookConfig {
    pub url: String,
    pub timeout: Duration,
    pub on_error: OnError,
}

impl HttpHookConfig {
    /// From the chain entry (`FilterConfig::Plugin::yaml`, the whole mapping).
    pub fn parse(yaml: &Value) -> Result<Self, HookConfigError> {
        let url = yaml
            .get("url")
            .and_then(Value::as_str)
            .ok_or(HookConfigError::MissingUrl)?
            .to_string();
        let timeout = match yaml.get("timeout") {
            None | Some(Value::Null) => Duration::from_secs(10),
            Some(v) => v
                .as_f64()
                .filter(|s| *s > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| HookConfigError::Invalid {
                    key: "timeout",
                    reason: format!("expected positive seconds, got {v}"),
                })?,
        };
        let on_error = match yaml.get("on_error").and_then(Value::as_str) {
            None | Some("tempfail") => OnError::TempFail,
            Some("accept") => OnError::Accept,
            Some(other) => {
                return Err(HookConfigError::Invalid {
                    key: "on_error",
                    reason: format!("expected tempfail or accept, got {other:?}"),
                });
            }
        };
        Ok(HttpHookConfig {
            url,
            timeout,
            on_error,
        })
    }
}

/// What a hook may answer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HookAnswer {
    mail_response: Option<Response>,
    #[serde(default)]
    rcpt_response: Vec<Option<Response>>,
    data_response: Option<Response>,
}

pub struct HttpHook {
    cfg: HttpHookConfig,
    client: awc::Client,
    /// (recipients, body finished) at the last call: the hook is asked again only when
    /// this moves.
    seen: Option<(usize, bool)>,
    /// The hook failed with `on_error: tempfail`: the transaction stops here.
    failed: Option<Response>,
}

impl HttpHook {
    pub fn new(cfg: HttpHookConfig) -> Self {
        let client = awc::Client::builder().timeout(cfg.timeout).finish();
        HttpHook {
            cfg,
            client,
            seen: None,
            failed: None,
        }
    }

    fn request(tx: &ChainTx) -> Value {
        let mut v: Value =
            serde_json::from_slice(&render_read(&tx.tx, None)).unwrap_or(Value::Null);
        if let Some(m) = &tx.tx.mail_from {
            v["mail_from"] = serde_json::to_value(m).unwrap_or(Value::Null);
        }
        v["rcpt_to"] = serde_json::to_value(&tx.tx.rcpt_to).unwrap_or(Value::Null);
        v["body_finalized"] = Value::Bool(tx.body_finalized());
        v
    }

    async fn call(&self, tx: &ChainTx) -> Result<HookAnswer, HookError> {
        let mut resp = self
            .client
            .post(&self.cfg.url)
            .send_json(&Self::request(tx))
            .await
            .map_err(|e| HookError::Send(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(HookError::Status(resp.status().as_u16()));
        }
        let body = resp
            .body()
            .limit(1 << 20)
            .await
            .map_err(|e| HookError::Answer(e.to_string()))?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(HookAnswer::default());
        }
        serde_json::from_slice(&body).map_err(|e| HookError::Answer(e.to_string()))
    }

    fn apply(tx: &mut ChainTx, a: HookAnswer) {
        if let Some(m) = a.mail_response
            && tx.tx.mail_from.is_some()
            && tx.tx.mail_response.is_none()
        {
            tx.tx.mail_response = Some(m);
        }
        for (i, r) in a.rcpt_response.into_iter().enumerate() {
            if let Some(r) = r
                && i < tx.tx.rcpt_to.len()
                && tx.rcpt_response(i).is_none()
            {
                tx.set_rcpt_response(i, r);
            }
        }
        if let Some(d) = a.data_response
            && tx.body_finalized()
            && tx.tx.data_response.is_none()
        {
            tx.tx.data_response = Some(d);
        }
    }
}

impl Filter for HttpHook {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            if let Some(r) = &self.failed {
                if !tx.tx.cancelled {
                    tx.fill_inflight(r);
                }
                return;
            }
            let state = (tx.tx.rcpt_to.len(), tx.body_finalized());
            if !tx.tx.cancelled && tx.tx.mail_from.is_some() && self.seen != Some(state) {
                self.seen = Some(state);
                match self.call(tx).await {
                    Ok(a) => Self::apply(tx, a),
                    Err(e) => {
                        tracing::warn!(url = %self.cfg.url, rest_id = %tx.rest_id, "http_hook: {e}");
                        if self.cfg.on_error == OnError::TempFail {
                            let r = Response::new(451, "4.3.0 http_hook failed");
                            tx.fill_inflight(&r);
                            self.failed = Some(r);
                            return;
                        }
                    }
                }
            }
            // A refused MAIL ends the transaction here.
            if tx.mail_failed() {
                tx.fill_preconditions();
                return;
            }
            next.run(tx).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config() {
        let c =
            HttpHookConfig::parse(&json!({"filter": "http_hook", "url": "http://h/x"})).unwrap();
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.on_error, OnError::TempFail);
        let c = HttpHookConfig::parse(
            &json!({"url": "http://h/x", "timeout": 0.5, "on_error": "accept"}),
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.on_error, OnError::Accept);
        assert_eq!(
            HttpHookConfig::parse(&json!({})),
            Err(HookConfigError::MissingUrl)
        );
        assert!(HttpHookConfig::parse(&json!({"url": "u", "on_error": "x"})).is_err());
    }

    #[test]
    fn answers_fill_only_open_requests() {
        let mut tx = ChainTx::default();
        tx.tx.mail_from = Some(koukan::Mailbox::new("a@x"));
        tx.tx.rcpt_to = vec![koukan::Mailbox::new("b@y"), koukan::Mailbox::new("c@y")];
        tx.set_rcpt_response(1, Response::new(250, "kept"));
        let a: HookAnswer = serde_json::from_value(json!({
            "rcpt_response": [{"code": 550, "message": "no"}, {"code": 550, "message": "no"}],
            "data_response": {"code": 250, "message": "ignored without a body"}
        }))
        .unwrap();
        HttpHook::apply(&mut tx, a);
        assert_eq!(tx.rcpt_response(0).unwrap().code, 550);
        assert_eq!(tx.rcpt_response(1).unwrap().message, "kept");
        assert_eq!(tx.tx.data_response, None);
        assert!(serde_json::from_value::<HookAnswer>(json!({"x": 1})).is_err());
    }
}
