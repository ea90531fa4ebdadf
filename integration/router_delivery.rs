//! The router process delivering to a receiver in the test process: a delivery cut short
//! by `kill -9` is finished after the restart, never lost and never repeated twice.

#[path = "../actors/tests/support/receiver.rs"]
mod receiver;

use std::time::{Duration, Instant};

use awc::Client;
use awc::http::StatusCode;
use serde_json::{Value, json};

use crate::harness::{PgDatabase, Process, ROUTER_BIN, free_port};
use receiver::Receiver;

const LIMIT: Duration = Duration::from_secs(60);

fn config(port: u16, storage_url: &str, receiver: &str) -> String {
    format!(
        r#"global:
  mailer_daemon_mailbox: mailer-daemon@example.com
rest_listener:
  addr: ["127.0.0.1", {port}]
  session_uri: http://127.0.0.1:{port}
sender:
- name: submission
  output_chain: out
  retry: output_chain
  notification: output_chain
  tag:
  - name: dsn
    notification: null
endpoint:
- name: out
  output_handler:
    retry_params: {{}}
    notification:
      sender: submission
      tag: dsn
  chain:
  - filter: rest_output
    static_endpoint: {receiver}
    rcpt_timeout: 30
    data_timeout: 30
storage:
  url: {storage_url}
  session_refresh_interval: 1
"#
    )
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(30)).finish()
}

async fn kill_during_delivery(storage_url: &str) {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("router.yaml");
    std::fs::write(&cfg, config(port, storage_url, &rx.endpoint())).unwrap();
    let mut router = Process::start(ROUTER_BIN, &cfg, port, dir.path(), "router");

    let message = "From: alice@example.com\r\nSubject: crash\r\n\r\nsurvive me\r\n";
    let resp = client()
        .post(format!(
            "http://127.0.0.1:{port}/senders/submission/transactions"
        ))
        .insert_header(("content-type", "application/json"))
        .send_body(
            json!({"mail_from": {"m": "alice@example.com"}, "rcpt_to": [{"m": "hold@example.net"}],
                   "body": {"inline": message}})
            .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    // The receiver has the whole message and holds its answer: the router is mid-delivery.
    rx.wait(LIMIT, "the body", |t| {
        t.iter().any(|t| t.to("hold") && t.body_finalized)
    })
    .await;
    router.kill9();
    rx.release();

    let mut router = Process::start(ROUTER_BIN, &cfg, port, dir.path(), "router-restarted");
    let c = client();
    let deadline = Instant::now() + LIMIT;
    let v = loop {
        let mut resp = c.get(&location).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", router.log());
        let v: Value = resp.json().await.unwrap();
        if v.get("final_attempt_reason").is_some() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "not finished: {v}\n{}",
            router.log()
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        v["final_attempt_reason"], "upstream response success",
        "{v}"
    );
    assert_eq!(v["attempt_count"], 2, "{v}");
    let got = rx.to("hold");
    assert_eq!(got.len(), 2, "exactly one more delivery: {got:#?}");
    for t in &got {
        assert_eq!(t.body, message.as_bytes());
    }
    assert!(rx.dsns().is_empty());
    assert!(router.terminate().success());
}

#[actix_rt::test]
async fn kill_9_during_delivery_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:///{}", dir.path().join("router.sqlite3").display());
    kill_during_delivery(&url).await;
}

#[actix_rt::test]
async fn kill_9_during_delivery_postgres() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    kill_during_delivery(&db.url()).await;
}

/// The binary registers `http_hook`: a configuration using it loads and serves.
#[test]
fn binary_accepts_http_hook() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("sqlite:///{}", dir.path().join("r.sqlite3").display());
    let yaml = config(port, &url, "http://127.0.0.1:9/senders/x/transactions").replace(
        "  chain:\n",
        "  chain:\n  - filter: http_hook\n    url: http://127.0.0.1:9/hook\n    on_error: accept\n",
    );
    assert!(yaml.contains("http_hook"));
    let cfg = dir.path().join("router.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut router = Process::start(ROUTER_BIN, &cfg, port, dir.path(), "router");
    assert!(router.terminate().success(), "{}", router.log());
}
