//! `content-range` handling for chunked blob uploads (`bytes <first>-<last>/<total or *>`).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad range")]
pub struct RangeError;

/// A chunk sent by a client: bytes `first..=last`, and the blob's total length if known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    pub last: u64,
    pub total: Option<u64>,
}

impl ContentRange {
    pub fn parse(s: &str) -> Result<ContentRange, RangeError> {
        let rest = s.trim().strip_prefix("bytes ").ok_or(RangeError)?;
        let (span, total) = rest.split_once('/').ok_or(RangeError)?;
        let total = match total.trim() {
            "*" => None,
            t => Some(parse_u64(t)?),
        };
        let (first, last) = span.split_once('-').ok_or(RangeError)?;
        let (first, last) = (parse_u64(first)?, parse_u64(last)?);
        if last < first {
            return Err(RangeError);
        }
        if let Some(t) = total
            && last >= t
        {
            return Err(RangeError);
        }
        Ok(ContentRange { first, last, total })
    }

    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The header a client sends for `len` bytes at `offset`.
    pub fn for_chunk(offset: u64, len: u64, total: Option<u64>) -> String {
        debug_assert!(len > 0);
        format!(
            "bytes {}-{}/{}",
            offset,
            offset + len - 1,
            total.map_or("*".to_string(), |t| t.to_string())
        )
    }
}

fn parse_u64(s: &str) -> Result<u64, RangeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError);
    }
    s.parse().map_err(|_| RangeError)
}

/// What a server holds of a blob, as sent back in `content-range` after every upload
/// request: `bytes 0-<len-1>/<total or *>`, or the RFC 9110 form `bytes */<total or *>`
/// when it holds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldRange {
    pub length: u64,
    pub total: Option<u64>,
}

impl HeldRange {
    pub fn header(&self) -> String {
        let total = self.total.map_or("*".to_string(), |t| t.to_string());
        if self.length == 0 {
            format!("bytes */{total}")
        } else {
            format!("bytes 0-{}/{}", self.length - 1, total)
        }
    }

    /// Parses a server's answer. The range must start at 0.
    pub fn parse(s: &str) -> Result<HeldRange, RangeError> {
        let rest = s.trim().strip_prefix("bytes ").ok_or(RangeError)?;
        if let Some(total) = rest.strip_prefix("*/") {
            let total = match total {
                "*" => None,
                t => Some(parse_u64(t)?),
            };
            return Ok(HeldRange { length: 0, total });
        }
        let r = ContentRange::parse(s)?;
        if r.first != 0 {
            return Err(RangeError);
        }
        Ok(HeldRange {
            length: r.last + 1,
            total: r.total,
        })
    }

    pub fn finalized(&self) -> bool {
        self.total == Some(self.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ranges() {
        assert_eq!(
            ContentRange::parse("bytes 0-6/*").unwrap(),
            ContentRange {
                first: 0,
                last: 6,
                total: None
            }
        );
        assert_eq!(
            ContentRange::parse("bytes 7-12/13").unwrap(),
            ContentRange {
                first: 7,
                last: 12,
                total: Some(13)
            }
        );
        for bad in [
            "bytes */13",
            "items 0-1/2",
            "bytes 5-4/*",
            "bytes 0-13/13",
            "bytes -1-2/*",
            "bytes 0-x/*",
            "",
        ] {
            assert_eq!(ContentRange::parse(bad), Err(RangeError), "{bad}");
        }
        assert_eq!(ContentRange::for_chunk(7, 6, Some(13)), "bytes 7-12/13");
        assert_eq!(ContentRange::for_chunk(0, 7, None), "bytes 0-6/*");
    }

    #[test]
    fn held() {
        assert_eq!(
            HeldRange {
                length: 13,
                total: Some(13)
            }
            .header(),
            "bytes 0-12/13"
        );
        assert_eq!(
            HeldRange {
                length: 7,
                total: None
            }
            .header(),
            "bytes 0-6/*"
        );
        assert_eq!(
            HeldRange {
                length: 0,
                total: Some(0)
            }
            .header(),
            "bytes */0"
        );
        assert_eq!(
            HeldRange {
                length: 0,
                total: None
            }
            .header(),
            "bytes */*"
        );
        assert_eq!(
            HeldRange::parse("bytes 0-12/13").unwrap(),
            HeldRange {
                length: 13,
                total: Some(13)
            }
        );
        assert_eq!(
            HeldRange::parse("bytes */0").unwrap(),
            HeldRange {
                length: 0,
                total: Some(0)
            }
        );
        assert!(HeldRange::parse("bytes 1-12/13").is_err());
        assert!(
            HeldRange {
                length: 13,
                total: Some(13)
            }
            .finalized()
        );
    }
}
