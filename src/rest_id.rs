//! Public transaction identifiers: URL-safe base64 of random bytes, unpadded.

use base64::Engine;
use rand::RngCore;

/// A new rest id carrying `entropy` random bytes (16 gives 22 characters).
pub fn new_rest_id(entropy: usize) -> String {
    let mut bytes = vec![0u8; entropy.max(1)];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// True if `s` could be a rest id (guards path segments before they reach storage).
pub fn is_valid_rest_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let id = new_rest_id(16);
        assert_eq!(id.len(), 22);
        assert!(is_valid_rest_id(&id));
        assert_eq!(new_rest_id(4).len(), 6);
        assert_ne!(new_rest_id(16), new_rest_id(16));
        assert!(!is_valid_rest_id("a/b"));
        assert!(!is_valid_rest_id(""));
    }
}
