//! Delivery status notifications (RFC 3464 `multipart/report`), built with mail-builder.

use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::mime::MimePart;

use koukan::Response;

/// What one bounce reports.
pub struct Dsn<'a> {
    /// `From` of the report; its domain names the reporting MTA.
    pub mailer_daemon: &'a str,
    /// The original reverse path, to whom the report goes.
    pub return_path: &'a str,
    pub recipient: &'a str,
    /// The original message's header block (lossily decoded).
    pub original_headers: &'a str,
    /// Unix seconds.
    pub arrival: Option<i64>,
    pub now: i64,
    pub response: &'a Response,
}

fn domain(mailbox: &str) -> &str {
    mailbox.rsplit_once('@').map_or(mailbox, |(_, d)| d)
}

/// The `Message-ID` of the original, if its headers have one.
fn original_message_id(headers: &str) -> Option<String> {
    let mut lines = headers.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("message-id") {
            let mut v = value.trim().to_string();
            // Folded continuation lines.
            while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
                v.push_str(next.trim());
                lines.next();
            }
            return Some(v.trim_matches(['<', '>']).to_string()).filter(|v| !v.is_empty());
        }
    }
    None
}

impl Dsn<'_> {
    pub fn render(&self) -> Vec<u8> {
        let reporting = domain(self.mailer_daemon);
        let status = if self.response.perm() {
            "5.0.0"
        } else {
            "4.0.0"
        };
        let mut report = format!("Reporting-MTA: dns;{reporting}\r\n");
        if let Some(arrival) = self.arrival.filter(|t| *t > 0) {
            report.push_str(&format!(
                "Arrival-Date: {}\r\n",
                Date::new(arrival).to_rfc822()
            ));
        }
        report.push_str(&format!(
            "\r\nFinal-Recipient: rfc822;{}\r\nAction: failed\r\nLast-Attempt-Date: {}\r\nStatus: {status}\r\nDiagnostic-Code: smtp;{} {}\r\n",
            self.recipient,
            Date::new(self.now).to_rfc822(),
            self.response.code,
            self.response.message.replace(['\r', '\n'], " "),
        ));
        let text = format!(
            "Delivery to {} failed permanently or for too long.\r\n\r\nThe server answered: {} {}\r\n",
            self.recipient, self.response.code, self.response.message
        );
        let token = koukan::rest_id::new_rest_id(16);
        let mut msg = MessageBuilder::new()
            .from(("Mail Delivery Subsystem", self.mailer_daemon))
            .to(self.return_path)
            .date(Date::new(self.now))
            .message_id(format!("{token}@{reporting}"))
            .subject("Delivery Status Notification (failure)");
        if let Some(id) = original_message_id(self.original_headers) {
            msg = msg.in_reply_to(id.clone()).references(id);
        }
        let headers_type = if self.original_headers.is_ascii() {
            ContentType::new("text/rfc822-headers").attribute("charset", "us-ascii")
        } else {
            ContentType::new("text/rfc822-headers").attribute("charset", "utf-8")
        };
        let body = MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
            vec![
                MimePart::new("text/plain", text),
                MimePart::new(
                    ContentType::new("message/delivery-status"),
                    report.into_bytes(),
                )
                .transfer_encoding("7bit"),
                MimePart::new(headers_type, self.original_headers.as_bytes().to_vec())
                    .transfer_encoding(if self.original_headers.is_ascii() {
                        "7bit"
                    } else {
                        "8bit"
                    }),
            ],
        );
        msg.body(body).write_to_vec().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    #[test]
    fn report_parses_as_multipart_report() {
        let resp = Response::new(550, "5.1.1 no such user");
        let dsn = Dsn {
            mailer_daemon: "mailer-daemon@example.com",
            return_path: "alice@example.com",
            recipient: "bob@example.net",
            original_headers: "Subject: hi\r\nMessage-ID: <abc@example.com>\r\n\r\n",
            arrival: Some(1_700_000_000),
            now: 1_700_000_100,
            response: &resp,
        }
        .render();
        let parsed = mail_parser::MessageParser::default().parse(&dsn).unwrap();
        let ct = parsed.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(
            parsed.subject(),
            Some("Delivery Status Notification (failure)")
        );
        assert_eq!(parsed.in_reply_to().as_text(), Some("abc@example.com"));
        let text = String::from_utf8_lossy(&dsn);
        assert!(
            text.contains("Final-Recipient: rfc822;bob@example.net"),
            "{text}"
        );
        assert!(text.contains("Status: 5.0.0"));
        assert!(text.contains("Diagnostic-Code: smtp;550 5.1.1 no such user"));
        assert!(text.contains("Reporting-MTA: dns;example.com"));
        assert_eq!(parsed.parts.len(), 4);
    }
}
