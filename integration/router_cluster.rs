//! Two routers sharing one PostgreSQL database.

use std::time::Duration;

use awc::Client;
use awc::http::StatusCode;
use serde_json::json;

use crate::harness::{PgDatabase, Process, ROUTER_BIN, free_port, router_config};

#[actix_rt::test]
async fn replica_without_the_lease_redirects_to_the_holder() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (ca, cb) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    std::fs::write(&ca, router_config(pa, &db.url())).unwrap();
    std::fs::write(&cb, router_config(pb, &db.url())).unwrap();
    let _a = Process::start(ROUTER_BIN, &ca, pa, dir.path(), "router-a");
    let _b = Process::start(ROUTER_BIN, &cb, pb, dir.path(), "router-b");

    let c = Client::builder()
        .timeout(Duration::from_secs(30))
        .max_redirects(0)
        .finish();
    let resp = c
        .post(format!(
            "http://127.0.0.1:{pa}/senders/submission/transactions"
        ))
        .insert_header(("content-type", "application/json"))
        .send_body(
            json!({"mail_from": {"m": "a@example.com"}, "rcpt_to": [{"m": "b@example.com"}]})
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
    let path = location
        .strip_prefix(&format!("http://127.0.0.1:{pa}"))
        .unwrap()
        .to_string();

    // Router B does not hold the lease: it points at A for reads, updates and uploads.
    let at_b = format!("http://127.0.0.1:{pb}{path}");
    let resp = c.get(&at_b).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        resp.headers().get("location").unwrap().to_str().unwrap(),
        location
    );
    let resp = c
        .patch(&at_b)
        .insert_header(("if-match", "1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    let resp = c.put(format!("{at_b}/body")).send_body("x").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        resp.headers().get("location").unwrap().to_str().unwrap(),
        format!("{location}/body")
    );
    // Following the redirect reaches the transaction.
    let resp = c.get(&location).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
