//! Golden tests of the REST JSON against the examples of the wire contract.

use koukan::rest::{
    BODY_BLOB, BlobSource, BlobStatus, BlobUri, BodyRequest, BodyView, CreateRequest,
    MessageBuilderView, ReadTx, RestJsonError, parse_update, render_create, render_read,
    render_update,
};
use koukan::transaction::Update;
use koukan::{EsmtpParam, HostPort, Mailbox, Response, Sender, Transaction};
use serde_json::json;

#[test]
fn gateway_create_request() {
    let body = br#"{"remote_host":["127.0.0.1",41066],"local_host":["127.0.0.1",1025],
     "mail_from":{"m":"alice@example.com","e":[{"k":"SIZE","p":"100"}]},
     "smtp_meta":{"ehlo_host":"localhost","esmtp":true,"tls":false,"auth":null},
     "sender":{"name":"ingress","tag":"smtp-mx"}}"#;
    let req = CreateRequest::parse(body).unwrap();
    assert_eq!(req.tag.as_deref(), Some("smtp-mx"));
    assert_eq!(req.tx.remote_host, Some(HostPort::new("127.0.0.1", 41066)));
    let mf = req.tx.mail_from.as_ref().unwrap();
    assert_eq!(mf.mailbox, "alice@example.com");
    assert_eq!(mf.esmtp, vec![EsmtpParam::new("SIZE", Some("100".into()))]);
    assert!(req.tx.rcpt_to.is_empty());
    assert!(req.body.is_none());
    assert_eq!(req.tx.smtp_meta.as_ref().unwrap()["esmtp"], json!(true));
}

#[test]
fn python_client_spacing_and_escapes() {
    let body = "{\"mail_from\": {\"m\": \"\\u00e9l\\u00e8ve@example.com\"}, \"rcpt_to\": [{\"m\": \"bob@example.com\"}], \"body\": {\"inline\": \"Subject: hi\\r\\n\\r\\nhello\\r\\n\"}}";
    let req = CreateRequest::parse(body.as_bytes()).unwrap();
    assert_eq!(req.tx.mail_from.unwrap().mailbox, "élève@example.com");
    assert_eq!(
        req.body,
        Some(BodyRequest::Inline("Subject: hi\r\n\r\nhello\r\n".into()))
    );
}

#[test]
fn create_rejections() {
    let cases: &[(&str, &str)] = &[
        (r#"[1]"#, "not a JSON object"),
        (r#"{"retry":{}}"#, "unknown field \"retry\""),
        (r#"{"notification":{}}"#, "unknown field"),
        (r#"{"mail_from":null}"#, "mail_from: null"),
        (r#"{"rcpt_to":[]}"#, "rcpt_to: empty list"),
        (r#"{"rcpt_to":{"m":"bob"}}"#, "rcpt_to"),
        (r#"{"mail_from":{"e":[]}}"#, "mail_from"),
        (r#"{"mail_from":"alice"}"#, "mail_from"),
        (r#"{"mail_from":{"m":"a","e":[{"p":"1"}]}}"#, "mail_from"),
        (r#"{"remote_host":{"h":1}}"#, "remote_host"),
        (r#"{"sender":"x"}"#, "sender: must be an object"),
        (r#"{"mail_response":{"code":250}}"#, "unknown field"),
        (r#"{"mail_from"#, "malformed JSON"),
    ];
    for (input, want) in cases {
        let err = CreateRequest::parse(input.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(want), "{input}: {err}");
        assert!(
            err.to_string().starts_with("invalid tx json"),
            "{input}: {err}"
        );
    }
    assert_eq!(
        CreateRequest::parse(br#"{"sender":{"name":"a","yaml":1}}"#).unwrap_err(),
        RestJsonError::SenderKeys
    );
    for body in [
        r#"{"body":{"inline":3}}"#,
        r#"{"body":{"blob_status":{"uri":"/x"}}}"#,
        r#"{"body":{"reuse_uri":"/transactions/abc/blob/x"}}"#,
        r#"{"body":{"reuse_uri":"/nope"}}"#,
        r#"{"body":{"message_builder":{"text_body":[{"content":{}}]}}}"#,
        r#"{"body":{"message_builder":{"text_body":[{"content":{"create_id":"__internal_x"}}]}}}"#,
        r#"{"body":{"message_builder":{"text_body":[{"content":{"create_id":"a"}},{"content":{"create_id":"a"}}]}}}"#,
        r#"{"body":{"message_builder":{"bogus":1}}}"#,
    ] {
        assert!(
            matches!(
                CreateRequest::parse(body.as_bytes()),
                Err(RestJsonError::Body(_))
            ),
            "{body}"
        );
    }
}

#[test]
fn body_shapes() {
    let parse = |s: &str| CreateRequest::parse(s.as_bytes()).unwrap().body;
    assert_eq!(parse(r#"{"body":{}}"#), None);
    assert_eq!(parse(r#"{"body":{"message_builder":{}}}"#), None);
    assert_eq!(
        parse(r#"{"body":{"message_builder":{},"inline":"x"}}"#),
        Some(BodyRequest::Inline("x".into()))
    );
    let reuse = BodyRequest::Reuse(BlobUri {
        tx: "F3G13g".into(),
        blob: BODY_BLOB.into(),
    });
    assert_eq!(
        parse(r#"{"body":{"reuse_uri":"http://localhost:8000/transactions/F3G13g/body"}}"#),
        Some(reuse.clone())
    );
    assert_eq!(
        parse(r#"{"body":{"reuse_uri":"/transactions/F3G13g/body"}}"#),
        Some(reuse)
    );
}

#[test]
fn message_builder_blob_ids() {
    let req = CreateRequest::parse(
        br#"{"mail_from":{"m":"alice@example.com"},"rcpt_to":[{"m":"bob@other.test"}],
 "body":{"message_builder":{"headers":[["subject","hello"]],
   "text_body":[{"content_type":"text/plain","content":{"inline":"hello, world!"}},
                {"content_type":"text/html","content":{"create_id":"my_html"}}],
   "file_attachments":[{"content":{"reuse_uri":"http://h/transactions/kG06gw/blob/pdf"}}]}}}"#,
    )
    .unwrap();
    let Some(BodyRequest::MessageBuilder { spec, blobs }) = req.body else {
        panic!("not a message builder body");
    };
    assert_eq!(
        blobs,
        vec![
            (
                "inline0".to_string(),
                BlobSource::Inline("hello, world!".into())
            ),
            ("my_html".to_string(), BlobSource::Create),
            (
                "pdf".to_string(),
                BlobSource::Reuse(BlobUri {
                    tx: "kG06gw".into(),
                    blob: "pdf".into()
                })
            ),
        ]
    );
    assert_eq!(
        spec["text_body"][0]["content"],
        json!({"create_id": "inline0"})
    );
    assert_eq!(spec["text_body"][1]["content_type"], json!("text/html"));
    assert_eq!(
        spec["file_attachments"][0]["content"],
        json!({"create_id": "pdf"})
    );

    let headers_only =
        CreateRequest::parse(br#"{"body":{"message_builder":{"headers":[["subject","x"]]}}}"#)
            .unwrap();
    assert!(matches!(
        headers_only.body,
        Some(BodyRequest::MessageBuilder { ref blobs, .. }) if blobs.is_empty()
    ));
}

#[test]
fn updates() {
    assert_eq!(
        parse_update(br#"{"rcpt_to":[{"m":"bob@example.com"}]}"#).unwrap(),
        Update {
            rcpt_to: vec![Mailbox::new("bob@example.com")],
            ..Default::default()
        }
    );
    let u = parse_update(br#"{"rcpt_to_list_offset":2,"rcpt_to":[{"m":"c"}]}"#).unwrap();
    assert_eq!(u.rcpt_to_list_offset, 2);
    assert_eq!(
        render_update(&u),
        br#"{"rcpt_to":[{"m":"c"}],"rcpt_to_list_offset":2}"#
    );
    for bad in [
        r#"{"retry":{}}"#,
        r#"{"mail_from":null}"#,
        r#"{"body":{"inline":"x"}}"#,
        r#"{"rcpt_to":[]}"#,
        r#"{"rcpt_to_list_offset":-1,"rcpt_to":[{"m":"c"}]}"#,
        "nope",
    ] {
        assert!(parse_update(bad.as_bytes()).is_err(), "{bad}");
    }
    assert!(
        parse_update(br#"{"filter_output":{"x":{}}}"#)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn read_view_golden() {
    // The finished first-class transaction of the router's end-to-end test.
    let tx = Transaction {
        mail_from: Some(Mailbox::new("alice@example.com")),
        mail_response: Some(Response::new(250, "ok")),
        rcpt_to: vec![Mailbox::new("bob@example.com")],
        rcpt_response: vec![Some(Response::new(250, "OK"))],
        data_response: Some(Response::new(250, "Message accepted for delivery")),
        attempt_count: Some(1),
        retry: true,
        final_attempt_reason: Some("upstream response success".into()),
        sender: Some(Sender::new("submission", None)),
        ..Default::default()
    };
    let body = BodyView {
        blob_status: Some(BlobStatus {
            uri: "http://localhost:8000/transactions/F3G13g/body".into(),
            finalized: true,
        }),
        message_builder: None,
    };
    let out = String::from_utf8(render_read(&tx, Some(&body))).unwrap();
    assert_eq!(
        out,
        r#"{"mail_from":{},"mail_response":{"code":250,"message":"ok"},"rcpt_to":[{}],"rcpt_response":[{"code":250,"message":"OK"}],"data_response":{"code":250,"message":"Message accepted for delivery"},"attempt_count":1,"body":{"blob_status":{"uri":"http://localhost:8000/transactions/F3G13g/body","finalized":true}},"retry":{},"final_attempt_reason":"upstream response success","sender":{}}"#
    );
    let back = ReadTx::parse(out.as_bytes()).unwrap();
    assert!(back.mail_from && back.sender && back.retry);
    assert_eq!(back.rcpt_to, 1);
    assert_eq!(back.body, Some(body));
    assert_eq!(
        back.final_attempt_reason.as_deref(),
        Some("upstream response success")
    );
}

#[test]
fn read_view_create_and_pending() {
    let tx = Transaction {
        mail_from: Some(Mailbox::new("a")),
        rcpt_to: vec![Mailbox::new("b"), Mailbox::new("c")],
        rcpt_response: vec![Some(Response::new(250, "ok")), None],
        retry: true,
        sender: Some(Sender::new("submission", None)),
        ..Default::default()
    };
    let body = BodyView {
        blob_status: Some(BlobStatus {
            uri: "http://router:8000/transactions/F3G13g/body".into(),
            finalized: false,
        }),
        message_builder: None,
    };
    assert_eq!(
        String::from_utf8(render_read(&tx, Some(&body))).unwrap(),
        r#"{"mail_from":{},"rcpt_to":[{},{}],"rcpt_response":[{"code":250,"message":"ok"}],"body":{"blob_status":{"uri":"http://router:8000/transactions/F3G13g/body"}},"retry":{},"sender":{}}"#
    );
    let mb = BodyView {
        blob_status: None,
        message_builder: Some(MessageBuilderView {
            uri: None,
            blob_status: Some(
                [
                    (
                        "inline0".to_string(),
                        BlobStatus {
                            uri: "u/blob/inline0".into(),
                            finalized: true,
                        },
                    ),
                    (
                        "my_html".to_string(),
                        BlobStatus {
                            uri: "u/blob/my_html".into(),
                            finalized: false,
                        },
                    ),
                ]
                .into(),
            ),
        }),
    };
    let out = String::from_utf8(render_read(&Transaction::default(), Some(&mb))).unwrap();
    assert_eq!(
        out,
        r#"{"body":{"message_builder":{"blob_status":{"inline0":{"uri":"u/blob/inline0","finalized":true},"my_html":{"uri":"u/blob/my_html"}}}}}"#
    );
}

#[test]
fn client_reads_receiver_shapes() {
    // The example receiver's create answer: finalized false, both body URIs, filter_output.
    let r = ReadTx::parse(
        br#"{"remote_host":["127.0.0.1",59356],"local_host":["127.0.0.1",1025],
 "mail_from":{},"rcpt_to":[{}],"sender":{},"filter_output":{},
 "mail_response":{"code":250,"message":"ok"},
 "rcpt_response":[{"code":250,"message":"ok"}],
 "body":{"blob_status":{"uri":"http://rcv:8002/transactions/x/body","finalized":false},
         "message_builder":{"uri":"http://rcv:8002/transactions/x/message_builder"}}}"#,
    )
    .unwrap();
    let body = r.body.unwrap();
    assert!(!body.blob_status.unwrap().finalized);
    assert_eq!(
        body.message_builder.unwrap().uri.as_deref(),
        Some("http://rcv:8002/transactions/x/message_builder")
    );
    for bad in [
        r#"{"mail_from":{"m":"alice"}}"#,
        r#"{"smtp_meta":{}}"#,
        r#"{"mail_response":{"code":"250"}}"#,
        r#"{"rcpt_to":[]}"#,
    ] {
        assert!(ReadTx::parse(bad.as_bytes()).is_err(), "{bad}");
    }
    let holes =
        ReadTx::parse(br#"{"rcpt_to":[{},{}],"rcpt_response":[null,{"code":250}]}"#).unwrap();
    assert_eq!(
        holes.rcpt_response,
        vec![None, Some(Response::new(250, "ok"))]
    );
}

#[test]
fn client_create_body() {
    let tx = Transaction {
        remote_host: Some(HostPort::new("127.0.0.1", 3025)),
        mail_from: Some(
            Mailbox::new("alice@example.com")
                .with_params(vec![EsmtpParam::new("SIZE", Some("100".into()))]),
        ),
        rcpt_to: vec![Mailbox::new("bob@example.com")],
        sender: Some(Sender::new("router", Some("outbound".into()))),
        ..Default::default()
    };
    let out = render_create(&tx, None);
    let parsed = CreateRequest::parse(&out).unwrap();
    assert_eq!(parsed.tag.as_deref(), Some("outbound"));
    assert_eq!(parsed.tx.mail_from, tx.mail_from);
    assert_eq!(parsed.tx.rcpt_to, tx.rcpt_to);
    assert_eq!(parsed.tx.remote_host, tx.remote_host);
}
