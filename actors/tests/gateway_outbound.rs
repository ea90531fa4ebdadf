//! The gateway's outbound half over real sockets: an awc client plays the router against
//! the REST listener, which delivers over SMTP/LMTP to an in-process sink.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use awc::Client;
use awc::http::StatusCode;
use koukan::config::GatewayConfig;
use koukan_actors::gateway::outbound::{OutboundOptions, RestListener};
use koukan_actors::tools::sink::{Sink, SinkOptions, StartTls};
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    free_port()
}

fn gateway_yaml(port: u16, gc: &str) -> String {
    format!(
        r#"
rest_listener:
  addr: ["127.0.0.1", {port}]
  session_uri: http://127.0.0.1:{port}
  chunk_size: 65536
{gc}
smtp_output:
  hosts:
    outbound:
      ehlo_host: gateway.test
      timeout: 10
      chunk_size: 4096
    bdat:
      ehlo_host: gateway.test
      enable_bdat: true
      timeout: 10
      chunk_size: 1000
    lmtp:
      ehlo_host: gateway.test
      protocol: lmtp
      timeout: 10
smtp_listener:
  services: []
"#
    )
}

struct Gw {
    listener: RestListener,
    base: String,
    client: Client,
}

async fn start_gateway_with(gc: &str) -> Gw {
    let port = free_port();
    let cfg = GatewayConfig::from_yaml_str(&gateway_yaml(port, gc)).unwrap();
    let (listener, server) = RestListener::start(
        Arc::new(cfg),
        OutboundOptions {
            http_workers: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    actix_rt::spawn(server);
    Gw {
        listener,
        base: format!("http://127.0.0.1:{port}"),
        client: Client::builder().timeout(Duration::from_secs(60)).finish(),
    }
}

async fn start_gateway() -> Gw {
    start_gateway_with("").await
}

async fn start_sink(f: impl FnOnce(&mut SinkOptions)) -> Sink {
    let mut o = SinkOptions::new("127.0.0.1:0".parse().unwrap());
    f(&mut o);
    Sink::start(o).await.unwrap()
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

/// A created transaction.
struct Tx {
    url: String,
    etag: String,
    json: Value,
}

impl Gw {
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

    async fn post_raw(&self, path: &str, body: &str) -> Reply {
        let req = self
            .client
            .post(self.url(path))
            .insert_header(("content-type", "application/json"));
        self.send(req, Some(body.as_bytes().to_vec())).await
    }

    async fn create(&self, json: Value) -> Tx {
        let r = self
            .post_raw("/senders/router/transactions", &json.to_string())
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        Tx {
            url: r.header("location").unwrap(),
            etag: r.etag(),
            json: r.json(),
        }
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.client.get(self.url(path));
        for h in headers {
            req = req.insert_header(*h);
        }
        self.send(req, None).await
    }

    async fn patch(&self, path: &str, etag: Option<&str>, json: Option<Value>) -> Reply {
        let mut req = self.client.patch(self.url(path));
        if let Some(e) = etag {
            req = req.insert_header(("if-match", e));
        }
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

    async fn cancel(&self, tx: &Tx) -> Reply {
        let req = self.client.post(format!("{}/cancel", tx.url));
        self.send(req, None).await
    }

    /// Long-polls until `done` holds for the read JSON.
    async fn wait(&self, tx: &mut Tx, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&tx.json) {
            assert!(
                Instant::now() < deadline,
                "timed out; last state {}",
                tx.json
            );
            let r = self
                .get(
                    &tx.url,
                    &[("if-none-match", &tx.etag), ("request-timeout", "5")],
                )
                .await;
            match r.status {
                StatusCode::OK => {
                    tx.etag = r.etag();
                    tx.json = r.json();
                }
                StatusCode::NOT_MODIFIED => {}
                s => panic!("GET {}: {s} {}", tx.url, r.text()),
            }
        }
        tx.json.clone()
    }

    async fn wait_envelope(&self, tx: &mut Tx, n_rcpt: usize) -> Value {
        self.wait(tx, |j| {
            j.get("mail_response").is_some()
                && j.get("rcpt_response")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.len() == n_rcpt)
        })
        .await
    }

    async fn wait_data(&self, tx: &mut Tx) -> Value {
        self.wait(tx, |j| j.get("data_response").is_some()).await
    }
}

fn envelope(sink: SocketAddr, tag: &str, rcpts: &[&str]) -> Value {
    json!({
        "remote_host": [sink.ip().to_string(), sink.port()],
        "local_host": ["127.0.0.1", 1025],
        "mail_from": {"m": "alice@example.com", "e": [{"k": "SIZE", "p": "100"}]},
        "rcpt_to": rcpts.iter().map(|r| json!({"m": r})).collect::<Vec<_>>(),
        "smtp_meta": {"ehlo_host": "localhost", "esmtp": true, "tls": false, "auth": false},
        "sender": {"name": "router", "tag": tag},
    })
}

fn code(v: &Value) -> u64 {
    v["code"].as_u64().unwrap()
}

const MESSAGE: &[u8] = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n";

/// Create, envelope responses, one plain PUT, data response; returns the final JSON.
async fn deliver(gw: &Gw, sink: &Sink, tag: &str, body: &[u8]) -> Value {
    let mut tx = gw
        .create(envelope(sink.addr, tag, &["bob@example.com"]))
        .await;
    let j = gw.wait_envelope(&mut tx, 1).await;
    assert_eq!(code(&j["mail_response"]), 250, "{j}");
    assert_eq!(code(&j["rcpt_response"][0]), 250, "{j}");
    let put = gw.put(&format!("{}/body", tx.url), &[], body).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    gw.wait_data(&mut tx).await
}

#[actix_rt::test]
async fn one_recipient() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    assert_eq!(tx.etag, "2", "create answers etag 2");
    assert!(tx.url.starts_with(&format!("{}/transactions/", gw.base)));
    let id = tx.url.rsplit('/').next().unwrap().to_string();
    assert_eq!(id.len(), 22);
    assert_eq!(
        tx.json,
        json!({"remote_host": [sink.addr.ip().to_string(), sink.addr.port()],
               "local_host": ["127.0.0.1", 1025],
               "mail_from": {}, "rcpt_to": [{}],
               "body": {"blob_status": {"uri": format!("{}/body", tx.url)}},
               "sender": {}})
    );
    let j = gw.wait_envelope(&mut tx, 1).await;
    assert_eq!(
        j["mail_response"],
        json!({"code": 250, "message": "2.1.0 ok"})
    );
    assert_eq!(code(&j["rcpt_response"][0]), 250);
    let put = gw.put(&format!("{}/body", tx.url), &[], MESSAGE).await;
    assert_eq!(put.status, StatusCode::OK);
    assert_eq!(
        put.header("content-range").unwrap(),
        format!("bytes 0-{}/{}", MESSAGE.len() - 1, MESSAGE.len())
    );
    let j = gw.wait_data(&mut tx).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    assert_eq!(j["body"]["blob_status"]["finalized"], json!(true));

    let m = sink.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].data, MESSAGE);
    assert_eq!(m[0].ehlo, "gateway.test");
    assert_eq!(m[0].mail_from, "alice@example.com");
    assert_eq!(
        m[0].mail_params,
        vec!["SIZE=100"],
        "SIZE sent: the sink advertises it"
    );
    assert_eq!(m[0].rcpt_to, vec!["bob@example.com"]);
    assert!(m[0].pipelined, "MAIL and RCPT pipelined");
    assert!(!m[0].bdat);
    assert!(
        sink.wait_sessions(Duration::from_secs(5), |s| s.len() == 1 && s[0].quit)
            .await,
        "QUIT after the data response: {:?}",
        sink.sessions()
    );
    // A cancel after the data response changes nothing.
    let before = gw.get(&tx.url, &[]).await;
    assert_eq!(gw.cancel(&tx).await.status, StatusCode::OK);
    let after = gw.get(&tx.url, &[]).await;
    assert_eq!(before.etag(), after.etag());
    assert!(after.json().get("cancelled").is_none());
}

/// `Prefer: wait` (RFC 7240): the create answers with the MAIL and RCPT replies and the
/// finalizing PUT with the DATA reply, each marked `preference-applied`; no long poll.
#[actix_rt::test]
async fn prefer_wait_answers_when_settled() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let req = gw
        .client
        .post(gw.url("/senders/router/transactions"))
        .insert_header(("content-type", "application/json"))
        .insert_header(("prefer", "wait=10"));
    let env = envelope(
        sink.addr,
        "outbound",
        &["bob@example.com", "nobody@example.com"],
    );
    let r = gw.send(req, Some(env.to_string().into_bytes())).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header("preference-applied").as_deref(), Some("wait"));
    let j = r.json();
    assert_eq!(code(&j["mail_response"]), 250, "{j}");
    assert_eq!(code(&j["rcpt_response"][0]), 250, "{j}");
    assert_eq!(code(&j["rcpt_response"][1]), 250, "{j}");
    let url = r.header("location").unwrap();
    // The version of the state shown, for the requests that follow.
    let shown = r.etag();
    let now = gw.get(&url, &[]).await;
    assert_eq!(now.etag(), shown);

    let put = gw
        .put(&format!("{url}/body"), &[("prefer", "wait=10")], MESSAGE)
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(put.header("preference-applied").as_deref(), Some("wait"));
    assert_eq!(
        put.header("content-range").unwrap(),
        format!("bytes 0-{}/{}", MESSAGE.len() - 1, MESSAGE.len())
    );
    let j = put.json();
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    let now: u64 = gw.get(&url, &[]).await.etag().parse().unwrap();
    assert!(now >= put.etag().parse::<u64>().unwrap());
    assert_eq!(sink.messages().len(), 1);

    // Without the preference the create answers at once, before any reply.
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    assert!(tx.json.get("mail_response").is_none(), "{}", tx.json);
    gw.wait_envelope(&mut tx, 1).await;
}

#[actix_rt::test]
async fn connection_reused_for_the_next_message_then_closed_when_idle() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    for _ in 0..2 {
        let j = deliver(&gw, &sink, "outbound", MESSAGE).await;
        assert_eq!(code(&j["data_response"]), 250, "{j}");
    }
    assert_eq!(sink.messages().len(), 2);
    let s = sink.sessions();
    assert_eq!(s.len(), 1, "one connection for both messages: {s:?}");
    assert_eq!(s[0].messages, 2);
    assert_eq!(
        s[0].commands.iter().filter(|c| *c == "EHLO").count(),
        1,
        "no second greeting: {:?}",
        s[0].commands
    );
    // Idle past the cache's limit: QUIT.
    assert!(
        sink.wait_sessions(Duration::from_secs(10), |s| s.len() == 1 && s[0].quit)
            .await,
        "QUIT once idle: {:?}",
        sink.sessions()
    );
    // The next message opens a new connection.
    let j = deliver(&gw, &sink, "outbound", MESSAGE).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    assert_eq!(sink.sessions().len(), 2);
}

/// An SMTP server that takes one message per connection and then closes it without a
/// word, as a server whose idle timeout passed would. Counts connections and messages.
async fn one_message_per_connection() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns, msgs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c2, m2) = (conns.clone(), msgs.clone());
    actix_rt::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            let msgs = m2.clone();
            actix_rt::spawn(async move {
                let (r, mut w) = tcp.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 once.test\r\n").await.unwrap();
                let mut line = String::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let reply: &[u8] = if in_data {
                        if line != ".\r\n" {
                            continue;
                        }
                        msgs.fetch_add(1, Ordering::SeqCst);
                        let _ = w.write_all(b"250 2.0.0 ok\r\n").await;
                        // Done with this connection: hang up.
                        return;
                    } else {
                        match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                            "EHLO" => b"250-once.test\r\n250 PIPELINING\r\n",
                            "DATA" => {
                                in_data = true;
                                b"354 go\r\n"
                            }
                            "QUIT" => b"221 bye\r\n",
                            _ => b"250 ok\r\n",
                        }
                    };
                    w.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (addr, conns, msgs)
}

#[actix_rt::test]
async fn cached_connection_closed_by_the_server_is_replaced() {
    let (addr, conns, msgs) = one_message_per_connection().await;
    let gw = start_gateway().await;
    for i in 1..=2 {
        let mut tx = gw
            .create(envelope(addr, "outbound", &["bob@example.com"]))
            .await;
        let j = gw.wait_envelope(&mut tx, 1).await;
        assert_eq!(code(&j["mail_response"]), 250, "{j}");
        let put = gw.put(&format!("{}/body", tx.url), &[], MESSAGE).await;
        assert_eq!(put.status, StatusCode::OK);
        let j = gw.wait_data(&mut tx).await;
        assert_eq!(code(&j["data_response"]), 250, "message {i}: {j}");
        assert_eq!(msgs.load(Ordering::SeqCst), i);
    }
    // The second message found the parked connection closed and opened another.
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[actix_rt::test]
async fn without_pipelining() {
    let sink = start_sink(|o| {
        o.pipelining = false;
        o.chunking = false;
    })
    .await;
    let gw = start_gateway().await;
    let j = deliver(&gw, &sink, "bdat", MESSAGE).await;
    assert_eq!(code(&j["data_response"]), 250);
    let m = sink.messages();
    assert!(
        !m[0].pipelined,
        "no PIPELINING advertised: one command at a time"
    );
    assert!(!m[0].bdat, "no CHUNKING advertised: DATA");
    assert_eq!(m[0].data, MESSAGE);
}

#[actix_rt::test]
async fn size_only_to_servers_advertising_it() {
    // The sink always advertises SIZE; a server that does not is covered by unit tests of
    // the parameter check. Here: BODY=8BITMIME and SMTPUTF8 are advertised and pass.
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let mut e = envelope(sink.addr, "outbound", &["bob@example.com"]);
    e["mail_from"]["e"] = json!([{"k": "BODY", "p": "8BITMIME"}, {"k": "SMTPUTF8"}, {"k": "XFOO"}]);
    let mut tx = gw.create(e).await;
    let j = gw.wait(&mut tx, |j| j.get("data_response").is_some()).await;
    assert_eq!(code(&j["mail_response"]), 504, "{j}");
    assert!(
        j["mail_response"]["message"]
            .as_str()
            .unwrap()
            .contains("XFOO")
    );
    assert_eq!(code(&j["rcpt_response"][0]), 503);
    assert_eq!(sink.count(), 0);
}

fn self_signed() -> Arc<rustls::ServerConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
    )
}

#[actix_rt::test]
async fn starttls_offered() {
    let sink = start_sink(|o| o.starttls = StartTls::On(self_signed())).await;
    let gw = start_gateway().await;
    let j = deliver(&gw, &sink, "outbound", MESSAGE).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    let m = sink.messages();
    assert!(m[0].tls, "delivered over TLS");
    assert_eq!(m[0].data, MESSAGE);
    let s = sink.sessions();
    assert_eq!(
        s[0].commands[..3],
        ["EHLO", "STARTTLS", "EHLO"].map(String::from)
    );
}

#[actix_rt::test]
async fn starttls_refused_or_broken() {
    // Refused: continue in plaintext on the same connection.
    let sink = start_sink(|o| o.starttls = StartTls::Refuse).await;
    let gw = start_gateway().await;
    let j = deliver(&gw, &sink, "outbound", MESSAGE).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    assert!(!sink.messages()[0].tls);
    assert_eq!(sink.sessions().len(), 1);

    // Handshake failure: reconnect and deliver in plaintext.
    let sink = start_sink(|o| o.starttls = StartTls::Break).await;
    let j = deliver(&gw, &sink, "outbound", MESSAGE).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    assert!(!sink.messages()[0].tls);
    let s = sink.sessions();
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(!s[1].commands.contains(&"STARTTLS".to_string()));
}

/// Lines that start with dots, a bare LF inside a line, no final CRLF.
const DOTTY: &[u8] = b"Subject: dots\r\n\r\n.one\r\n..two\r\n.\r\nend . here\r\n.";

#[actix_rt::test]
async fn data_dot_stuffing() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let j = deliver(&gw, &sink, "outbound", DOTTY).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    let m = sink.messages();
    assert!(!m[0].bdat);
    // DATA needs a final CRLF: the one added is the only change.
    assert_eq!(m[0].data, [DOTTY, b"\r\n"].concat());
}

#[actix_rt::test]
async fn bdat_multi_chunk() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    // Binary-ish body: BDAT carries it untouched; host chunk_size is 1000.
    let body: Vec<u8> = (0..5500u32).map(|i| (i * 7 % 256) as u8).collect();
    let body = [DOTTY, &body].concat();
    let j = deliver(&gw, &sink, "bdat", &body).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    let m = sink.messages();
    assert!(m[0].bdat);
    assert_eq!(m[0].data, body);
    let s = sink.sessions();
    let bdats = s[0].commands.iter().filter(|c| *c == "BDAT").count();
    assert_eq!(bdats, body.len().div_ceil(1000), "{:?}", s[0].commands);
}

#[actix_rt::test]
async fn lmtp_per_recipient_replies() {
    let sink = start_sink(|o| o.lmtp = true).await;
    let gw = start_gateway().await;
    let mut tx = gw
        .create(envelope(sink.addr, "lmtp", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut tx, 1).await;
    // A second recipient by PATCH, as the incremental dialect allows.
    let p = gw
        .patch(
            &tx.url,
            Some(&tx.etag),
            Some(json!({"rcpt_to": [{"m": "datatemp@example.com"}], "rcpt_to_list_offset": 1})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text());
    tx.etag = p.etag();
    tx.json = p.json();
    let j = gw.wait_envelope(&mut tx, 2).await;
    assert_eq!(code(&j["rcpt_response"][1]), 250);
    let put = gw.put(&format!("{}/body", tx.url), &[], MESSAGE).await;
    assert_eq!(put.status, StatusCode::OK);
    let j = gw.wait_data(&mut tx).await;
    // One reply per recipient: 250 for bob, 450 for datatemp; a retry beats a bounce.
    assert_eq!(code(&j["data_response"]), 450, "{j}");
    let s = sink.sessions();
    assert_eq!(s[0].commands[0], "LHLO");

    // All accepted: 250.
    let j = deliver(&gw, &sink, "lmtp", MESSAGE).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
}

#[actix_rt::test]
async fn recipient_rejected() {
    let sink = start_sink(|o| o.fail_rcpt = vec!["*@nowhere.com".into()]).await;
    let gw = start_gateway().await;
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@nowhere.com"]))
        .await;
    let j = gw.wait_data(&mut tx).await;
    assert_eq!(code(&j["mail_response"]), 250);
    assert_eq!(code(&j["rcpt_response"][0]), 550, "{j}");
    assert_eq!(code(&j["data_response"]), 554, "{j}");
    assert!(
        sink.wait_sessions(Duration::from_secs(5), |s| s[0].quit)
            .await
    );
    assert_eq!(sink.count(), 0);
}

#[actix_rt::test]
async fn sink_down() {
    let gw = start_gateway().await;
    let mut tx = gw
        .create(json!({
            "remote_host": ["127.0.0.1", closed_port()],
            "mail_from": {"m": "alice@example.com"},
            "rcpt_to": [{"m": "bob@example.com"}],
            "sender": {"name": "router", "tag": "outbound"},
        }))
        .await;
    let j = gw.wait(&mut tx, |j| j.get("mail_response").is_some()).await;
    let m = &j["mail_response"];
    assert!((400..500).contains(&code(m)), "{j}");
    assert!(
        m["message"].as_str().unwrap().contains("connect error"),
        "{j}"
    );

    // A host name is not an address: the router resolves, not the gateway.
    let mut tx = gw
        .create(json!({
            "remote_host": ["localhost", 25],
            "mail_from": {"m": "alice@example.com"},
            "rcpt_to": [{"m": "bob@example.com"}],
            "sender": {"name": "router", "tag": "outbound"},
        }))
        .await;
    let j = gw.wait(&mut tx, |j| j.get("mail_response").is_some()).await;
    assert_eq!(code(&j["mail_response"]), 400);
    assert!(
        j["mail_response"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid IP address")
    );
}

#[actix_rt::test]
async fn ten_megabytes_in_chunks() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let mut body = Vec::with_capacity(10 << 20);
    let mut i = 0u64;
    while body.len() < 10 << 20 {
        let line = if i.is_multiple_of(7) {
            format!(".line {i} starting with a dot\r\n")
        } else {
            format!("line {i} {}\r\n", "x".repeat((i % 60) as usize))
        };
        body.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut tx, 1).await;
    let chunk = 1 << 20;
    let total = body.len();
    let uri = format!("{}/body", tx.url);
    for (n, piece) in body.chunks(chunk).enumerate() {
        let first = n * chunk;
        let last = first + piece.len() - 1;
        let total_s = if last + 1 == total {
            total.to_string()
        } else {
            "*".to_string()
        };
        let range = format!("bytes {first}-{last}/{total_s}");
        let r = gw.put(&uri, &[("content-range", &range)], piece).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.header("content-range").unwrap(),
            format!("bytes 0-{last}/{total_s}")
        );
    }
    // A stale chunk is refused with the server's length.
    let r = gw
        .put(&uri, &[("content-range", "bytes 0-0/*")], b"x")
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 0-{}/{total}", total - 1)
    );
    let j = gw.wait_data(&mut tx).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    let m = sink.messages();
    assert_eq!(m[0].data.len(), body.len());
    assert!(m[0].data == body, "byte-identical");
}

#[actix_rt::test]
async fn cancel_before_data() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut tx, 1).await;
    let c = gw.cancel(&tx).await;
    assert_eq!(c.status, StatusCode::OK);
    let j = gw.wait(&mut tx, |j| j.get("cancelled").is_some()).await;
    assert_eq!(j["cancelled"], json!(true));
    assert!(
        sink.wait_sessions(Duration::from_secs(5), |s| s[0].quit)
            .await,
        "{:?}",
        sink.sessions()
    );
    assert_eq!(sink.count(), 0);
    // Cancelling again changes nothing.
    let before = gw.get(&tx.url, &[]).await.etag();
    assert_eq!(gw.cancel(&tx).await.status, StatusCode::OK);
    assert_eq!(gw.get(&tx.url, &[]).await.etag(), before);
    // No upload after a cancel.
    let put = gw.put(&format!("{}/body", tx.url), &[], MESSAGE).await;
    assert_eq!(put.status, StatusCode::CONFLICT);
}

#[actix_rt::test]
async fn rest_errors_and_long_poll() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;

    // Tag: missing or unknown.
    let mut e = envelope(sink.addr, "outbound", &["bob@example.com"]);
    e["sender"] = json!({"name": "router"});
    let r = gw
        .post_raw("/senders/router/transactions", &e.to_string())
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    e["sender"] = json!({"name": "router", "tag": "nope"});
    let r = gw
        .post_raw("/senders/router/transactions", &e.to_string())
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Bad JSON, unknown field.
    for bad in ["{", "[]", r#"{"retry": {}}"#, r#"{"rcpt_to": []}"#] {
        let r = gw.post_raw("/senders/router/transactions", bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }

    // Unknown ids: 404 everywhere.
    let unknown = format!("{}/transactions/AAAAAAAAAAAAAAAAAAAAAA", gw.base);
    assert_eq!(gw.get(&unknown, &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        gw.patch(&unknown, Some("1"), None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        gw.put(&format!("{unknown}/body"), &[], b"x").await.status,
        StatusCode::NOT_FOUND
    );
    let r = gw
        .send(gw.client.post(format!("{unknown}/cancel")), None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut tx, 1).await;
    // No blobs on the gateway.
    let r = gw.put(&format!("{}/blob/x", tx.url), &[], b"x").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Long poll on the current version: an empty 304 echoing the etag, after the timeout.
    let t0 = Instant::now();
    let quoted = format!("\"{}\"", tx.etag);
    let r = gw
        .get(
            &tx.url,
            &[("if-none-match", &quoted), ("request-timeout", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.etag(), quoted);
    assert!(r.body.is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let r = gw
        .get(
            &tx.url,
            &[("if-none-match", &tx.etag), ("request-timeout", "x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // PATCH rules.
    let r = gw.patch(&tx.url, None, None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "if-match required");
    let r = gw.patch(&tx.url, Some("1"), None).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = gw
        .patch(&tx.url, Some(&tx.etag), Some(json!({"retry": {}})))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let req = gw
        .client
        .patch(&tx.url)
        .insert_header(("if-match", tx.etag.as_str()))
        .insert_header(("content-type", "application/json"));
    assert_eq!(
        gw.send(req, Some(b"{nope".to_vec())).await.status,
        StatusCode::BAD_REQUEST
    );
    // A heartbeat bumps the version, and wakes a hanging GET.
    let etag = tx.etag.clone();
    let waiter = {
        let client = gw.client.clone();
        let url = tx.url.clone();
        let etag = etag.clone();
        actix_rt::spawn(async move {
            let r = client
                .get(&url)
                .insert_header(("if-none-match", etag.as_str()))
                .insert_header(("request-timeout", "10"))
                .send()
                .await
                .unwrap();
            (r.status(), r.headers().get("etag").cloned())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let r = gw.patch(&tx.url, Some(&etag), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let new = r.etag();
    assert_eq!(
        new.parse::<u64>().unwrap(),
        etag.parse::<u64>().unwrap() + 1
    );
    let (status, woke) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(woke.unwrap().to_str().unwrap(), new);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "notified, not polled"
    );
    // Bad ranges.
    let r = gw
        .put(
            &format!("{}/body", tx.url),
            &[("content-range", "bytes 5-1/*")],
            b"x",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = gw
        .put(
            &format!("{}/body", tx.url),
            &[("content-range", "bytes 3-3/*")],
            b"x",
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range").unwrap(), "bytes */*");
}

#[actix_rt::test]
async fn gc_forgets_transactions() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway_with("  gc_interval: 0.2\n  gc_tx_ttl: 1\n  gc_done_ttl: 0.5\n").await;
    // Finished: forgotten after gc_done_ttl.
    let mut done = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut done, 1).await;
    gw.put(&format!("{}/body", done.url), &[], MESSAGE).await;
    gw.wait_data(&mut done).await;
    // Idle and unfinished: cancelled (QUIT) and forgotten after gc_tx_ttl.
    let mut idle = gw
        .create(envelope(sink.addr, "outbound", &["carol@example.com"]))
        .await;
    gw.wait_envelope(&mut idle, 1).await;
    // Any request resets the idle clock: a read now keeps both alive for a while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.get(&done.url, &[]).await.status, StatusCode::OK);
    assert_eq!(gw.get(&idle.url, &[]).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(gw.get(&done.url, &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(gw.get(&idle.url, &[]).await.status, StatusCode::NOT_FOUND);
    // The second transaction may have taken the first one's parked connection.
    assert!(
        sink.wait_sessions(Duration::from_secs(5), |s| !s.is_empty()
            && s.len() <= 2
            && s.iter().all(|s| s.quit))
            .await,
        "{:?}",
        sink.sessions()
    );
    assert_eq!(sink.count(), 1);
    assert!(gw.listener.registry.is_empty());
}

#[actix_rt::test]
async fn crashed_actor_is_restarted_with_a_temporary_failure() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut tx, 1).await;
    let id = tx.url.rsplit('/').next().unwrap();
    let (addr, _) = gw.listener.registry.lookup(id).unwrap();
    let _ = addr.send(koukan_actors::gateway::outbound::Crash).await;
    let j = gw.wait_data(&mut tx).await;
    assert_eq!(code(&j["data_response"]), 450, "{j}");
    assert_eq!(code(&j["mail_response"]), 250, "earlier responses kept");
}

#[actix_rt::test]
async fn inline_body_and_zero_length_finalize() {
    let sink = start_sink(|_| {}).await;
    let gw = start_gateway().await;
    let mut e = envelope(sink.addr, "outbound", &["bob@example.com"]);
    e["body"] = json!({"inline": "Subject: inline\r\n\r\nbody\r\n"});
    let mut tx = gw.create(e).await;
    let j = gw.wait_data(&mut tx).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    assert_eq!(j["body"]["blob_status"]["finalized"], json!(true));

    // Open chunk, then x-finalize-blob-length.
    let mut tx = gw
        .create(envelope(sink.addr, "outbound", &["bob@example.com"]))
        .await;
    gw.wait_envelope(&mut tx, 1).await;
    let uri = format!("{}/body", tx.url);
    let r = gw
        .put(&uri, &[("content-range", "bytes 0-6/*")], b"Subj: x")
        .await;
    assert_eq!(r.header("content-range").unwrap(), "bytes 0-6/*");
    let r = gw.put(&uri, &[("x-finalize-blob-length", "5")], b"").await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    let r = gw.put(&uri, &[("x-finalize-blob-length", "7")], b"").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-range").unwrap(), "bytes 0-6/7");
    let j = gw.wait_data(&mut tx).await;
    assert_eq!(code(&j["data_response"]), 250, "{j}");
    assert_eq!(sink.messages()[1].data, b"Subj: x\r\n");
}

/// The binary: starts from a YAML file, serves, exits 0 on SIGTERM; a bad config exits 2.
#[test]
fn gateway_binary() {
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_koukan-gateway");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, gateway_yaml(port, "")).unwrap();
    let mut child = Command::new(bin)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        assert!(Instant::now() < deadline, "did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // It serves: an unknown transaction is a 404.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /transactions/nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));

    std::fs::write(&path, "rest_listener: {addr: [\"127.0.0.1\", 1]}\n").unwrap();
    let out = Command::new(bin).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rest_listener.session_uri"), "{err}");
}
