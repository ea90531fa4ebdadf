//! The router binary as a process: durability across kill -9, clean shutdown, config errors.

use std::process::Command;
use std::time::Duration;

use awc::Client;
use awc::http::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Process, ROUTER_BIN, free_port, router_config};

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .max_redirects(0)
        .finish()
}

#[actix_rt::test]
async fn committed_transaction_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = dir.path().join("router.sqlite3");
    let config = dir.path().join("router.yaml");
    std::fs::write(
        &config,
        router_config(port, &format!("sqlite:///{}", db.display())),
    )
    .unwrap();
    let mut router = Process::start(ROUTER_BIN, &config, port, dir.path(), "router");

    let c = client();
    let message = "From: alice@example.com\r\nSubject: durable\r\n\r\nkeep me\r\n";
    let mut resp = c
        .post(format!(
            "http://127.0.0.1:{port}/senders/submission/transactions"
        ))
        .insert_header(("content-type", "application/json"))
        .send_body(
            json!({"mail_from": {"m": "alice@example.com"}, "rcpt_to": [{"m": "bob@example.com"}],
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
    let created: Value = resp.json().await.unwrap();
    // The 201 means committed: kill the process before it can do anything else.
    router.kill9();

    let mut router = Process::start(ROUTER_BIN, &config, port, dir.path(), "router-restarted");
    // A fresh client: the old one's pooled connection died with the process.
    let c = client();
    let mut resp = c.get(&location).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", router.log());
    let read: Value = resp.json().await.unwrap();
    assert_eq!(read["mail_from"], json!({}));
    assert_eq!(read["rcpt_to"], json!([{}]));
    assert_eq!(read["body"], created["body"]);
    assert_eq!(read["body"]["blob_status"]["finalized"], json!(true));
    assert!(router.terminate().success());
}

#[actix_rt::test]
async fn sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("router.yaml");
    let url = format!("sqlite:///{}", dir.path().join("r.sqlite3").display());
    std::fs::write(&config, router_config(port, &url)).unwrap();
    let mut router = Process::start(ROUTER_BIN, &config, port, dir.path(), "router");
    let status = router.terminate();
    assert!(status.success(), "exit {status}:\n{}", router.log());
    assert!(
        router.log_lines().iter().any(|l| l.contains("stopped")),
        "{}",
        router.log()
    );
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.yaml");
    let url = format!("sqlite:///{}", dir.path().join("r.sqlite3").display());
    let yaml = router_config(free_port(), &url).replace("filter: exploder", "filter: dkimm");
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(ROUTER_BIN).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"endpoint[1].chain[0].filter: unknown filter "dkimm""#),
        "{stderr}"
    );

    let out = Command::new(ROUTER_BIN).output().unwrap();
    assert!(!out.status.success(), "the config path is required");
    let out = Command::new(ROUTER_BIN)
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));
}
