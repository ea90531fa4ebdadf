//! SMTP replies: multi-line rendering, enhanced status codes, router responses.

use koukan::Response;

use crate::client::ClientError;

/// Longest text per reply line (RFC 5321 allows 512 octets with the code).
const MAX_LINE_TEXT: usize = 400;

/// One SMTP reply: code, enhanced status code (`"2.1.0"`, empty for none), text lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub esc: String,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, esc: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            esc: esc.to_string(),
            text: text.into(),
        }
    }

    /// A router response. Codes that cannot be SMTP replies become 451; a message that
    /// does not start with an enhanced code of the right class gets `default_esc`
    /// (`"x.1.0"`, the class digit replaced).
    pub fn from_response(r: &Response, default_esc: &str) -> Reply {
        let (code, text) = if (200..=599).contains(&r.code) && !(300..400).contains(&r.code) {
            (r.code, r.message.as_str())
        } else {
            (451, "upstream response not valid in SMTP")
        };
        let class = (code / 100) as u8;
        let (esc, text) = match split_esc(text) {
            Some((esc, rest)) if esc.as_bytes()[0] == b'0' + class => (esc.to_string(), rest),
            _ => {
                let rest = default_esc.get(1..).unwrap_or(".0.0");
                (format!("{class}{rest}"), text)
            }
        };
        Reply {
            code,
            esc,
            text: text.to_string(),
        }
    }

    /// A failed exchange with the router: always temporary.
    pub fn from_client_error(e: &ClientError) -> Reply {
        let esc = if e.is_timeout() { "4.4.2" } else { "4.4.1" };
        Reply::new(451, esc, e.to_string())
    }

    /// Appends the wire form to `out`: one line per text line, continuation lines with
    /// `-`, control characters removed, long lines cut.
    pub fn write(&self, out: &mut Vec<u8>) {
        let lines: Vec<String> = self
            .text
            .split('\n')
            .map(clean_line)
            .filter(|l| !l.is_empty())
            .collect();
        let lines = if lines.is_empty() {
            vec![String::new()]
        } else {
            lines
        };
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(sep as u8);
            if !self.esc.is_empty() {
                out.extend_from_slice(self.esc.as_bytes());
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn clean_line(l: &str) -> String {
    let mut s: String = l.chars().filter(|c| !c.is_control()).collect();
    if s.len() > MAX_LINE_TEXT {
        let mut cut = MAX_LINE_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s.trim().to_string()
}

/// `"5.1.1 rest"` → (`"5.1.1"`, `"rest"`).
fn split_esc(text: &str) -> Option<(&str, &str)> {
    let (head, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = head.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let ok = parts.next().is_none()
        && matches!(class, "2" | "4" | "5")
        && (1..=3).contains(&subject.len())
        && (1..=3).contains(&detail.len())
        && subject
            .bytes()
            .chain(detail.bytes())
            .all(|b| b.is_ascii_digit());
    ok.then_some((head, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut v = Vec::new();
        r.write(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn renders_router_responses() {
        let r = Reply::from_response(&Response::new(250, "MAIL ok (exploder noop)"), "2.1.0");
        assert_eq!(wire(&r), "250 2.1.0 MAIL ok (exploder noop)\r\n");
        let r = Reply::from_response(&Response::new(550, "5.1.1 mailbox does not exist"), "2.1.5");
        assert_eq!(wire(&r), "550 5.1.1 mailbox does not exist\r\n");
        let r = Reply::from_response(&Response::new(451, "5.1.1 wrong class"), "2.1.5");
        assert_eq!(wire(&r), "451 4.1.5 5.1.1 wrong class\r\n");
        let r = Reply::from_response(&Response::new(600, "x"), "2.0.0");
        assert_eq!(r.code, 451);
        let r = Reply::from_response(&Response::new(250, "first\r\nsecond\nthird"), "2.6.0");
        assert_eq!(
            wire(&r),
            "250-2.6.0 first\r\n250-2.6.0 second\r\n250 2.6.0 third\r\n"
        );
        assert_eq!(wire(&Reply::new(354, "", "go ahead")), "354 go ahead\r\n");
    }
}
