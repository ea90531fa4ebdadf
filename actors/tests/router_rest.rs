//! The router's REST API over real HTTP against an in-process router on a real SQLite file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use awc::Client;
use awc::http::StatusCode;
use koukan::config::RouterConfig;
use koukan_actors::router::{Crash, Router, Settings};
use serde_json::{Value, json};

/// `submission`: first-class REST (retry + notification); `smtp` with tag `mx`: incremental.
/// Deliveries go to a destination that accepts connections and never answers, so nothing
/// upstream changes a transaction while these tests look at the REST surface.
fn config(port: u16, db: &std::path::Path, sink: u16) -> Arc<RouterConfig> {
    let yaml = format!(
        r#"global:
  mailer_daemon_mailbox: mailer-daemon@example.com
rest_listener:
  addr: ["127.0.0.1", {port}]
  session_uri: http://127.0.0.1:{port}
  chunk_size: 8
sender:
- name: submission
  output_chain: submission
  retry: output_chain
  notification: output_chain
  tag:
  - name: dsn
    notification: null
  - name: relay
    retry: null
    notification: null
- name: smtp
  output_chain: smtp
  upstream_sender: submission
  upstream_tag: relay
  tag:
  - name: mx
endpoint:
- name: submission
  output_handler:
    retry_params: {{}}
    notification:
      sender: submission
      tag: dsn
  chain:
  - filter: rest_output
    static_endpoint: http://127.0.0.1:{sink}/senders/x/transactions
    rcpt_timeout: 120
- name: smtp
  output_handler:
    downstream_timeout: 120
  chain:
  - filter: exploder
    rcpt_timeout: 120
storage:
  url: sqlite:///{db}
"#,
        db = db.display()
    );
    Arc::new(RouterConfig::from_yaml_str(&yaml).unwrap())
}

struct TestRouter {
    router: Router,
    base: String,
    client: Client,
    _dir: tempfile::TempDir,
    _silent: std::net::TcpListener,
}

async fn start_router() -> TestRouter {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // A destination that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = silent.local_addr().unwrap().port();
    let cfg = config(port, &dir.path().join("router.sqlite3"), sink);
    let mut settings = Settings::from_config(cfg).unwrap();
    settings.http_workers = 2;
    let (router, server) = Router::start(settings).await.unwrap();
    actix_rt::spawn(server);
    TestRouter {
        router,
        base,
        client: Client::builder().timeout(Duration::from_secs(40)).finish(),
        _dir: dir,
        _silent: silent,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Reply {
    status: StatusCode,
    headers: awc::http::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
    fn etag(&self) -> String {
        self.header("etag").expect("etag")
    }
    fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/json")
        );
        serde_json::from_slice(&self.body).unwrap()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl TestRouter {
    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    async fn send(&self, req: awc::ClientRequest, body: Option<Vec<u8>>) -> Reply {
        let mut resp = match body {
            Some(b) => req.send_body(b).await.unwrap(),
            None => req.send().await.unwrap(),
        };
        let body = resp.body().limit(64 << 20).await.unwrap().to_vec();
        Reply {
            status: resp.status(),
            headers: resp.headers().clone(),
            body,
        }
    }

    async fn post(&self, path: &str, json: Value) -> Reply {
        let req = self
            .client
            .post(self.url(path))
            .insert_header(("content-type", "application/json"));
        self.send(req, Some(json.to_string().into_bytes())).await
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.client.get(self.url(path));
        for h in headers {
            req = req.insert_header(*h);
        }
        self.send(req, None).await
    }

    async fn patch(&self, path: &str, etag: &str, json: Option<Value>) -> Reply {
        let mut req = self
            .client
            .patch(self.url(path))
            .insert_header(("if-match", etag));
        match json {
            Some(j) => {
                req = req.insert_header(("content-type", "application/json"));
                self.send(req, Some(j.to_string().into_bytes())).await
            }
            None => self.send(req, Some(Vec::new())).await,
        }
    }

    async fn put(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut req = self.client.put(self.url(path));
        for h in headers {
            req = req.insert_header(*h);
        }
        self.send(req, Some(body.to_vec())).await
    }
}

fn submission(body: Value) -> Value {
    json!({"mail_from": {"m": "alice@example.com"}, "rcpt_to": [{"m": "bob@example.com"}], "body": body})
}

#[actix_rt::test]
async fn create_read_and_long_poll() {
    let r = start_router().await;
    let created = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"inline": "Subject: hi\r\n\r\nhello\r\n"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let location = created.header("location").unwrap();
    assert!(location.starts_with(&format!("{}/transactions/", r.base)));
    let id = location.rsplit('/').next().unwrap().to_string();
    assert_eq!(id.len(), 22);
    // Created with its first attempt started, in one commit.
    let v = created.etag();
    assert_eq!(
        created.json(),
        json!({"mail_from": {}, "rcpt_to": [{}], "attempt_count": 1,
               "body": {"blob_status": {"uri": format!("{}/transactions/{id}/body", r.base), "finalized": true}},
               "notification": {}, "retry": {}, "sender": {}})
    );

    // Point read.
    let read = r.get(&location, &[]).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.etag(), v);
    assert_eq!(read.json(), created.json());

    // A long poll on the current version times out with an empty 304 echoing the etag.
    let started = Instant::now();
    let quoted = format!("\"{v}\"");
    let unchanged = r
        .get(
            &location,
            &[("if-none-match", quoted.as_str()), ("request-timeout", "1")],
        )
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);
    assert_eq!(unchanged.etag(), quoted);
    assert!(unchanged.body.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A stale etag answers at once.
    let stale = r.get(&location, &[("if-none-match", "0")]).await;
    assert_eq!(stale.status, StatusCode::OK);

    // A long poll wakes up when the version moves (here a heartbeat from another request).
    let poll_headers = [("if-none-match", v.as_str()), ("request-timeout", "10")];
    let poll = r.get(&location, &poll_headers);
    let beat = async {
        actix_rt::time::sleep(Duration::from_millis(200)).await;
        r.patch(&location, &v, None).await
    };
    let started = Instant::now();
    let (polled, beat) = futures_util::join!(poll, beat);
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.text());
    let next = (v.parse::<i64>().unwrap() + 1).to_string();
    assert_eq!(beat.etag(), next);
    assert_eq!(polled.status, StatusCode::OK);
    assert_eq!(polled.etag(), next);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[actix_rt::test]
async fn incremental_dialect() {
    let r = start_router().await;
    let created = r
        .post(
            "/senders/smtp/transactions",
            json!({"remote_host": ["127.0.0.1", 41066], "local_host": ["127.0.0.1", 1025],
                   "mail_from": {"m": "alice@example.com", "e": [{"k": "SIZE", "p": "100"}]},
                   "smtp_meta": {"ehlo_host": "localhost", "esmtp": true, "tls": false, "auth": false},
                   "sender": {"name": "ingress", "tag": "mx"}}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let loc = created.header("location").unwrap();
    let id = loc.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        created.json(),
        json!({"remote_host": ["127.0.0.1", 41066], "local_host": ["127.0.0.1", 1025],
               "mail_from": {}, "attempt_count": 1,
               "body": {"blob_status": {"uri": format!("{}/transactions/{id}/body", r.base)}},
               "sender": {}})
    );
    // The exploder answers MAIL by itself.
    let mut read = r.get(&loc, &[]).await;
    let mut etag = read.etag();
    while read.json().get("mail_response").is_none() {
        read = r
            .get(
                &loc,
                &[("if-none-match", etag.as_str()), ("request-timeout", "5")],
            )
            .await;
        if read.status == StatusCode::OK {
            etag = read.etag();
        }
    }
    assert_eq!(
        read.json()["mail_response"],
        json!({"code": 250, "message": "MAIL ok (exploder noop)"})
    );

    let p = r
        .patch(
            &loc,
            &etag,
            Some(json!({"rcpt_to": [{"m": "bob@example.com"}]})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text());
    assert_eq!(p.json()["rcpt_to"], json!([{}]));
    etag = p.etag();
    // A wrong offset is a client error, not a server failure.
    let bad = r
        .patch(
            &loc,
            &etag,
            Some(json!({"rcpt_to_list_offset": 3, "rcpt_to": [{"m": "c@example.com"}]})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // A stale etag: 412 without an etag.
    let stale = r
        .patch(
            &loc,
            "1",
            Some(json!({"rcpt_to_list_offset": 1, "rcpt_to": [{"m": "c@example.com"}]})),
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert!(stale.header("etag").is_none());
    let p = r
        .patch(
            &loc,
            &etag,
            Some(json!({"rcpt_to_list_offset": 1, "rcpt_to": [{"m": "c@example.com"}]})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text());
    assert_eq!(p.json()["rcpt_to"], json!([{}, {}]));
    etag = p.etag();
    // A different mail_from is refused; the same one is ignored.
    let other = r
        .patch(
            &loc,
            &etag,
            Some(json!({"mail_from": {"m": "eve@example.com"}})),
        )
        .await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    let same = r
        .patch(
            &loc,
            &etag,
            Some(json!({"mail_from": {"m": "alice@example.com"}})),
        )
        .await;
    assert_eq!(same.status, StatusCode::OK);

    // The body: the spec's chunked sequence.
    let body_uri = format!("{loc}/body");
    let put = r
        .put(&body_uri, &[("content-range", "bytes 0-6/*")], b"hello, ")
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(put.header("content-range").as_deref(), Some("bytes 0-6/*"));
    let gap = r
        .put(&body_uri, &[("content-range", "bytes 10-11/*")], b"xx")
        .await;
    assert_eq!(gap.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(gap.header("content-range").as_deref(), Some("bytes 0-6/*"));
    let overlap = r
        .put(&body_uri, &[("content-range", "bytes 5-12/*")], b", world!")
        .await;
    assert_eq!(overlap.status, StatusCode::OK, "{}", overlap.text());
    assert_eq!(
        overlap.header("content-range").as_deref(),
        Some("bytes 0-12/*")
    );
    let wrong = r
        .put(&body_uri, &[("x-finalize-blob-length", "100")], b"")
        .await;
    assert_eq!(wrong.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        wrong.header("content-range").as_deref(),
        Some("bytes 0-12/*")
    );
    let nonempty = r
        .put(&body_uri, &[("x-finalize-blob-length", "13")], b"x")
        .await;
    assert_eq!(nonempty.status, StatusCode::BAD_REQUEST);
    let bad = r
        .put(&body_uri, &[("x-finalize-blob-length", "quux")], b"")
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let done = r
        .put(&body_uri, &[("x-finalize-blob-length", "13")], b"")
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    assert_eq!(
        done.header("content-range").as_deref(),
        Some("bytes 0-12/13")
    );
    let past = r
        .put(&body_uri, &[("content-range", "bytes 13-16/17")], b"more")
        .await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        past.header("content-range").as_deref(),
        Some("bytes 0-12/13")
    );

    let read = r.get(&loc, &[]).await;
    assert_eq!(read.json()["body"]["blob_status"]["finalized"], json!(true));
    // No recipients after the body.
    let late = r
        .patch(
            &loc,
            &read.etag(),
            Some(json!({"rcpt_to_list_offset": 2, "rcpt_to": [{"m": "d@example.com"}]})),
        )
        .await;
    assert_eq!(late.status, StatusCode::BAD_REQUEST);
}

#[actix_rt::test]
async fn uploads() {
    let r = start_router().await;
    // A body uploaded in one plain PUT, streamed in 8-byte batches by the server.
    let created = r
        .post("/senders/submission/transactions", submission(Value::Null))
        .await;
    assert_eq!(
        created.status,
        StatusCode::BAD_REQUEST,
        "body: null is invalid"
    );
    let created = r
        .post(
            "/senders/submission/transactions",
            json!({"mail_from": {"m": "a@example.com"}, "rcpt_to": [{"m": "b@example.com"}]}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let loc = created.header("location").unwrap();
    let uri = created.json()["body"]["blob_status"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(uri, format!("{loc}/body"));
    let msg = b"Subject: test\r\n\r\nA body longer than the chunk size.\r\n";
    let put = r.put(&uri, &[], msg).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(
        put.header("content-range"),
        Some(format!("bytes 0-{}/{}", msg.len() - 1, msg.len()))
    );
    assert_eq!(put.body, b"{}");
    // The finalizing write's version, so a client's next long poll starts from it.
    let put_etag: i64 = put
        .header("etag")
        .expect("etag of the finalization")
        .parse()
        .unwrap();
    // Re-sending the identical finalized body is accepted; a longer one is not.
    let again = r.put(&uri, &[], msg).await;
    assert_eq!(again.status, StatusCode::OK);
    let mut longer = msg.to_vec();
    longer.extend_from_slice(b"more");
    assert_eq!(
        r.put(&uri, &[], &longer).await.status,
        StatusCode::RANGE_NOT_SATISFIABLE
    );
    let read = r.get(&loc, &[]).await;
    assert_eq!(read.json()["body"]["blob_status"]["finalized"], json!(true));
    assert_ne!(read.etag(), "1", "finalization bumps the version");
    assert!(read.etag().parse::<i64>().unwrap() >= put_etag);

    // Reuse of that body by a new transaction.
    let reused = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"reuse_uri": uri})),
        )
        .await;
    assert_eq!(reused.status, StatusCode::CREATED, "{}", reused.text());
    assert_eq!(
        reused.json()["body"]["blob_status"]["finalized"],
        json!(true)
    );

    // An empty plain PUT finalizes at zero bytes.
    let empty = r
        .post(
            "/senders/submission/transactions",
            json!({"mail_from": {"m": "a@example.com"}, "rcpt_to": [{"m": "b@example.com"}]}),
        )
        .await;
    let eloc = empty.header("location").unwrap();
    let put = r.put(&format!("{eloc}/body"), &[], b"").await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(put.header("content-range").as_deref(), Some("bytes */0"));

    // Header checks.
    let bad_range = r
        .put(
            &format!("{eloc}/body"),
            &[("content-range", "bytes */13")],
            b"",
        )
        .await;
    assert_eq!(bad_range.status, StatusCode::BAD_REQUEST);
    let mismatch = r
        .put(
            &format!("{eloc}/body"),
            &[("content-range", "bytes 0-9/*")],
            b"abc",
        )
        .await;
    assert_eq!(mismatch.status, StatusCode::BAD_REQUEST);
    let internal = r
        .put(&format!("{eloc}/blob/__internal_tx_body"), &[], b"abc")
        .await;
    assert_eq!(internal.status, StatusCode::NOT_FOUND);
    let unknown = r.put(&format!("{eloc}/blob/nope"), &[], b"abc").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.text(), "unknown blob");
    let no_tx = r.put("/transactions/nope/body", &[], b"abc").await;
    assert_eq!(no_tx.status, StatusCode::NOT_FOUND);
}

#[actix_rt::test]
async fn message_builder() {
    let r = start_router().await;
    let created = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"message_builder": {"headers": [["subject", "hello"]],
                "text_body": [{"content_type": "text/plain", "content": {"inline": "hello, world!"}},
                              {"content_type": "text/html", "content": {"create_id": "my_html"}}]}})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let loc = created.header("location").unwrap();
    let id = loc.rsplit('/').next().unwrap();
    assert_eq!(
        created.json()["body"],
        json!({"message_builder": {"blob_status": {
            "inline0": {"uri": format!("{}/transactions/{id}/blob/inline0", r.base), "finalized": true},
            "my_html": {"uri": format!("{}/transactions/{id}/blob/my_html", r.base)}}}})
    );
    let raw = r.put(&format!("{loc}/body"), &[], b"x").await;
    assert_eq!(raw.status, StatusCode::CONFLICT);
    let put = r
        .put(&format!("{loc}/blob/my_html"), &[], b"<b>hi</b>!!")
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(
        put.header("content-range").as_deref(),
        Some("bytes 0-10/11")
    );
    let read = r.get(&loc, &[]).await;
    assert_eq!(
        read.json()["body"]["message_builder"]["blob_status"]["my_html"]["finalized"],
        json!(true)
    );
    // Reuse of a finalized blob by id, and of an unknown one.
    let reuse = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"message_builder": {"text_body": [
                {"content_type": "text/html", "content": {"reuse_uri": format!("{loc}/blob/my_html")}}]}})),
        )
        .await;
    assert_eq!(reuse.status, StatusCode::CREATED, "{}", reuse.text());
    assert_eq!(
        reuse.json()["body"]["message_builder"]["blob_status"]["my_html"]["finalized"],
        json!(true)
    );
    let bad = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"message_builder": {"text_body": [
                {"content": {"reuse_uri": "/transactions/nope/blob/x"}}]}})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text());
}

#[actix_rt::test]
async fn bad_requests() {
    let r = start_router().await;
    let cases: Vec<(&str, Value, StatusCode)> = vec![
        (
            "/senders/nobody/transactions",
            submission(json!({"inline": "x"})),
            StatusCode::NOT_FOUND,
        ),
        (
            "/senders/smtp/transactions",
            json!({"sender": {"tag": "nope"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/senders/submission/transactions",
            json!({"sender": {"tag": "x"}, "mail_from": {"m": "a"}, "rcpt_to": [{"m": "b"}]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/senders/submission/transactions",
            json!({"mail_from": {"m": "a"}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/senders/submission/transactions",
            json!({"retry": {}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/senders/submission/transactions",
            json!({"mail_from": {"x": "a"}, "rcpt_to": [{"m": "b"}]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/senders/submission/transactions",
            json!([1, 2]),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (path, body, want) in cases {
        let reply = r.post(path, body.clone()).await;
        assert_eq!(reply.status, want, "{path} {body}: {}", reply.text());
        assert!(
            !reply.text().is_empty(),
            "{path} {body}: error has a reason"
        );
    }
    let malformed = r
        .send(
            r.client.post(r.url("/senders/submission/transactions")),
            Some(b"{\"mail_from\":".to_vec()),
        )
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert!(
        malformed.text().contains("malformed JSON"),
        "{}",
        malformed.text()
    );

    assert_eq!(
        r.get("/transactions/nope", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(r.get("/nowhere", &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.send(r.client.delete(r.url("/transactions/x")), None)
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let created = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"inline": "x"})),
        )
        .await;
    let loc = created.header("location").unwrap();
    let timeout = r
        .get(&loc, &[("if-none-match", "1"), ("request-timeout", "soon")])
        .await;
    assert_eq!(timeout.status, StatusCode::BAD_REQUEST);
    assert_eq!(timeout.text(), "invalid request-timeout header");
    let no_etag = r.send(r.client.patch(r.url(&loc)), Some(Vec::new())).await;
    assert_eq!(no_etag.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_etag.text(), "etags required for update");
    let json_patch = r
        .patch(&loc, "1", Some(json!({"rcpt_to": [{"m": "c"}]})))
        .await;
    assert_eq!(json_patch.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        json_patch.text(),
        "endpoint does not accept incremental updates"
    );
    let text_patch = r
        .send(
            r.client
                .patch(r.url(&loc))
                .insert_header(("if-match", "1"))
                .insert_header(("content-type", "text/plain")),
            Some(b"hello".to_vec()),
        )
        .await;
    assert_eq!(text_patch.status, StatusCode::BAD_REQUEST);
    let bad_json = r
        .send(
            r.client
                .patch(r.url(&loc))
                .insert_header(("if-match", "1"))
                .insert_header(("content-type", "application/json")),
            Some(b"{".to_vec()),
        )
        .await;
    assert_eq!(bad_json.status, StatusCode::BAD_REQUEST);
    let unknown = r.patch("/transactions/nope", "1", None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[actix_rt::test]
async fn cancel() {
    let r = start_router().await;
    let created = r
        .post(
            "/senders/submission/transactions",
            json!({"mail_from": {"m": "a@example.com"}, "rcpt_to": [{"m": "b@example.com"}]}),
        )
        .await;
    let loc = created.header("location").unwrap();
    let c = r
        .send(r.client.post(r.url(&format!("{loc}/cancel"))), None)
        .await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(c.body.is_empty());
    let read = r.get(&loc, &[]).await;
    let j = read.json();
    assert_eq!(j["cancelled"], json!(true));
    assert_eq!(j["final_attempt_reason"], json!("downstream cancelled"));
    // The running attempt then ends (its final write releases the lease): wait until the
    // version settles.
    let mut etag = read.etag();
    loop {
        let polled = r
            .get(
                &loc,
                &[("if-none-match", etag.as_str()), ("request-timeout", "2")],
            )
            .await;
        if polled.status == StatusCode::NOT_MODIFIED {
            break;
        }
        etag = polled.etag();
        assert_eq!(
            polled.json()["final_attempt_reason"],
            json!("downstream cancelled")
        );
    }
    // Cancelling a finished transaction changes nothing.
    let again = r
        .send(r.client.post(r.url(&format!("{loc}/cancel"))), None)
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(r.get(&loc, &[]).await.etag(), etag);
    let unknown = r
        .send(r.client.post(r.url("/transactions/nope/cancel")), None)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[actix_rt::test]
async fn supervision_restarts_then_fails_a_crashing_transaction() {
    let r = start_router().await;
    let bystander = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"inline": "x"})),
        )
        .await
        .header("location")
        .unwrap();
    let victim = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"inline": "y"})),
        )
        .await
        .header("location")
        .unwrap();
    let id = victim.rsplit('/').next().unwrap().to_string();
    for round in 1..=3 {
        let addr = r.router.registry.get(&id).expect("actor running");
        let _ = addr.send(Crash).await; // the mailbox closes as the actor dies
        let read = r.get(&victim, &[]).await;
        assert_eq!(
            read.status,
            StatusCode::OK,
            "round {round}: {}",
            read.text()
        );
        let reason = read.json()["final_attempt_reason"].clone();
        if round < 3 {
            assert_eq!(reason, Value::Null, "restarted from storage, state intact");
        } else {
            assert_eq!(reason, json!("internal error: transaction actor crashed"));
        }
    }
    // Everything else keeps working.
    assert_eq!(r.get(&bystander, &[]).await.status, StatusCode::OK);
    let fresh = r
        .post(
            "/senders/submission/transactions",
            submission(json!({"inline": "z"})),
        )
        .await;
    assert_eq!(fresh.status, StatusCode::CREATED);
}
