//! Idle SMTP connections kept for the next message to the same destination.
//!
//! A delivery that ended cleanly (its last data reply read) leaves its connection here
//! instead of sending QUIT; the next delivery to the same address, with the same host
//! settings and TLS policy, on the same arbiter thread, starts with MAIL on it. That saves
//! the connect, greeting, EHLO (and STARTTLS) and QUIT round trips per message on both
//! ends. A connection idle for [`IDLE_LIMIT`] is closed with QUIT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::delivery::TlsPolicy;

/// How long an idle connection is kept: far below any server's idle timeout (RFC 5321
/// asks for 5 minutes), so a cached connection is almost never found closed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(2);

/// Idle connections kept per destination; more are closed at once.
const MAX_IDLE: usize = 64;

/// What a connection can be reused for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    /// Identity of the host settings (EHLO name, protocol, timeouts) it was opened with.
    pub host: usize,
    pub tls: TlsPolicy,
}

/// The idle connections of one arbiter thread.
pub struct Pool<C> {
    idle: HashMap<Key, Vec<(u64, C)>>,
    next_id: u64,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool {
            idle: HashMap::new(),
            next_id: 0,
        }
    }
}

impl<C> Pool<C> {
    /// The most recently parked connection for `key`.
    pub fn take(&mut self, key: &Key) -> Option<C> {
        let list = self.idle.get_mut(key)?;
        let c = list.pop().map(|(_, c)| c);
        if list.is_empty() {
            self.idle.remove(key);
        }
        c
    }

    /// Parks `conn`; its id (for [`expire`](Self::expire)), or the connection back when
    /// the destination already has enough idle ones.
    pub fn put(&mut self, key: Key, conn: C) -> Result<u64, C> {
        let list = self.idle.entry(key).or_default();
        if list.len() >= MAX_IDLE {
            return Err(conn);
        }
        self.next_id += 1;
        list.push((self.next_id, conn));
        Ok(self.next_id)
    }

    /// Removes connection `id` if it is still parked.
    pub fn expire(&mut self, key: &Key, id: u64) -> Option<C> {
        let list = self.idle.get_mut(key)?;
        let i = list.iter().position(|(i, _)| *i == id)?;
        let (_, c) = list.remove(i);
        if list.is_empty() {
            self.idle.remove(key);
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> Key {
        Key {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            host: 1,
            tls: TlsPolicy::Opportunistic,
        }
    }

    #[test]
    fn newest_first_per_key_and_expiry_by_id() {
        let mut p = Pool::default();
        let a = p.put(key(25), "a").unwrap();
        let _b = p.put(key(25), "b").unwrap();
        p.put(key(26), "c").unwrap();
        assert_eq!(p.take(&key(25)), Some("b"));
        assert_eq!(p.expire(&key(25), a), Some("a"));
        assert_eq!(p.take(&key(25)), None);
        assert_eq!(p.expire(&key(25), a), None, "already gone");
        let mut other = key(26);
        other.tls = TlsPolicy::Required;
        assert_eq!(p.take(&other), None, "another TLS policy is another key");
        assert_eq!(p.take(&key(26)), Some("c"));
    }

    #[test]
    fn bounded_per_destination() {
        let mut p = Pool::default();
        for i in 0..MAX_IDLE {
            assert!(p.put(key(25), i).is_ok());
        }
        assert_eq!(p.put(key(25), 99), Err(99));
        assert!(p.put(key(26), 99).is_ok());
    }
}
