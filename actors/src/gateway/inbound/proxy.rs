//! HAProxy PROXY protocol v1 header (`spec/gateway.md` §4).

use std::net::IpAddr;
use std::time::Duration;

use koukan::HostPort;

use super::session::{Line, Session, Stop};

/// Longest v1 header, CRLF included.
const MAX_HEADER: usize = 107;

/// `PROXY TCP4 src dst sport dport`: the addresses, `None` for `PROXY UNKNOWN`.
fn parse(line: &[u8]) -> Result<Option<(HostPort, HostPort)>, ()> {
    let text = std::str::from_utf8(line).map_err(|_| ())?;
    let text = text.strip_suffix("\r\n").ok_or(())?;
    let mut f = text.split(' ');
    if f.next() != Some("PROXY") {
        return Err(());
    }
    match f.next() {
        Some("UNKNOWN") => Ok(None),
        Some(proto @ ("TCP4" | "TCP6")) => {
            let ip = |s: Option<&str>| -> Result<IpAddr, ()> {
                let a: IpAddr = s.ok_or(())?.parse().map_err(|_| ())?;
                if a.is_ipv4() == (proto == "TCP4") {
                    Ok(a)
                } else {
                    Err(())
                }
            };
            let port = |s: Option<&str>| s.ok_or(())?.parse::<u16>().map_err(|_| ());
            let (src, dst) = (ip(f.next())?, ip(f.next())?);
            let (sp, dp) = (port(f.next())?, port(f.next())?);
            if f.next().is_some() {
                return Err(());
            }
            Ok(Some((
                HostPort::new(src.to_string(), sp),
                HostPort::new(dst.to_string(), dp),
            )))
        }
        _ => Err(()),
    }
}

impl Session {
    /// Reads the PROXY header before the greeting; a missing or malformed one closes
    /// the connection.
    pub(super) async fn read_proxy_header(&mut self, timeout: Duration) -> Result<(), Stop> {
        let line = actix_rt::time::timeout(timeout, self.read_line(MAX_HEADER, false))
            .await
            .map_err(|_| Stop::Done)??;
        let Line::Ok(line) = line else {
            return Err(Stop::Done);
        };
        match parse(&line) {
            Ok(Some((remote, local))) => {
                self.remote = Some(remote);
                self.local = Some(local);
            }
            Ok(None) => {
                // No addresses: neither is sent to the router.
                self.remote = None;
                self.local = None;
            }
            Err(()) => {
                tracing::info!("bad PROXY header, closing");
                return Err(Stop::Done);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let (r, l) = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r, HostPort::new("192.0.2.1", 56324));
        assert_eq!(l, HostPort::new("198.51.100.2", 25));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(None));
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(b"EHLO x\r\n").is_err());
    }
}
