//! Grant tokens: `pcl_` + 40 base62 characters of randomness + a 6-character base62 CRC32 of
//! everything before it. The prefix lets secret scanners find leaked tokens, the checksum lets
//! them (and the gateway) reject typos and random strings without a database lookup. Only the
//! SHA-256 of the whole token is stored.

use sha2::{Digest, Sha256};

/// Every grant token starts with this.
pub const PREFIX: &str = "pcl_";
const BODY_LEN: usize = 40;
const CHECK_LEN: usize = 6;
/// The length of a whole token.
pub const TOKEN_LEN: usize = PREFIX.len() + BODY_LEN + CHECK_LEN;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly made token: shown once, never stored. `Debug` does not show it.
pub struct NewToken(String);

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewToken(redacted)")
    }
}

impl NewToken {
    /// A new random token.
    pub fn generate() -> NewToken {
        let mut body = String::with_capacity(TOKEN_LEN);
        body.push_str(PREFIX);
        let mut buf = [0u8; 64];
        while body.len() < PREFIX.len() + BODY_LEN {
            getrandom::fill(&mut buf).expect("the OS random source is available");
            // 248 = 4 * 62: rejecting larger bytes keeps every character equally likely.
            for b in buf.iter().filter(|b| **b < 248) {
                if body.len() == PREFIX.len() + BODY_LEN {
                    break;
                }
                body.push(ALPHABET[usize::from(*b % 62)] as char);
            }
        }
        body.extend(checksum(&body).map(char::from));
        NewToken(body)
    }

    /// The token text, to print once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps.
    pub fn hash(&self) -> [u8; 32] {
        hash(&self.0)
    }
}

/// SHA-256 of the token text.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn checksum(text: &str) -> [u8; CHECK_LEN] {
    let mut n = crc32fast::hash(text.as_bytes());
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `text` has the shape and checksum of a grant token (no lookup).
pub fn well_formed(text: &str) -> bool {
    text.len() == TOKEN_LEN
        && text.starts_with(PREFIX)
        && text[PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric())
        && checksum(&text[..TOKEN_LEN - CHECK_LEN]) == text.as_bytes()[TOKEN_LEN - CHECK_LEN..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_recognisable_and_checked() {
        let t = NewToken::generate();
        assert!(t.expose().starts_with("pcl_"));
        assert_eq!(t.expose().len(), TOKEN_LEN);
        assert!(well_formed(t.expose()));
        assert_ne!(t.expose(), NewToken::generate().expose());
        let mut typo = t.expose().to_owned().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        assert!(!well_formed(&String::from_utf8(typo).expect("ascii")));
        assert!(!well_formed("pcl_short"));
        assert!(!well_formed(&t.expose().replace("pcl_", "xyz_")));
        assert_eq!(format!("{t:?}"), "NewToken(redacted)");
        assert_eq!(t.hash(), hash(t.expose()));
    }
}
