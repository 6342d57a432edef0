//! Revision ids: `N-hash`, where `N` is the generation and the hash is deterministic.
//!
//! A revision made by Ferry hashes its parent revision, its deleted flag and the canonical
//! encoding of its body, so the same edit made independently on two replicas yields the same
//! revision id and replicates as one revision rather than as a conflict. Revisions made by other
//! CouchDB-protocol peers (PouchDB picks random hashes) are accepted as long as their hash is
//! plain ASCII alphanumerics; the tree only needs revision ids to be comparable and unique.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The longest revision hash accepted from another peer (CouchDB and PouchDB use 32).
pub const MAX_REV_HASH_LEN: usize = 64;

/// The largest generation a revision may have: 2^53 - 1, the largest integer a JavaScript
/// peer (PouchDB parses generations into numbers) holds exactly. A revision beyond it is
/// refused wherever it comes from, so no stored revision is one that some replica cannot read,
/// and a revision at it cannot be edited further ([`GenerationExhausted`]): the child's
/// generation would be one past it. No real document comes near: at a million edits a second
/// it takes 285 years.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// Why no child of a revision can be made: it is at [`MAX_GENERATION`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revision {parent} is at the largest generation ({MAX_GENERATION}): it cannot be edited")]
pub struct GenerationExhausted {
    /// The revision that cannot have a child.
    pub parent: Rev,
}

/// A revision id such as `3-8f2a…`.
///
/// Ordering is the one winner selection uses: generation first, then the hash compared as
/// bytes, exactly as CouchDB and PouchDB compare revision ids.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Rev {
    generation: u64,
    hash: Box<str>,
}

/// Why a string is not a revision id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid revision {text:?}: {reason}")]
pub struct RevParseError {
    /// The refused text (truncated to 80 characters).
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Rev {
    /// Builds a revision id from its parts, checking them as [`FromStr`] does.
    pub fn new(generation: u64, hash: &str) -> Result<Rev, RevParseError> {
        let refuse = |reason| RevParseError {
            text: format!("{generation}-{}", truncate(hash)),
            reason,
        };
        validate_generation(generation).map_err(refuse)?;
        validate_hash(hash).map_err(refuse)?;
        Ok(Rev {
            generation,
            hash: hash.into(),
        })
    }

    /// Computes the revision id of an edit: the child of `parent` (or a first revision) with the
    /// given deleted flag and canonical body bytes. Fails only for a parent at
    /// [`MAX_GENERATION`].
    ///
    /// ```
    /// use ferry_core::rev::Rev;
    /// let first = Rev::compute(None, false, br#"{"title":"milk"}"#)?;
    /// assert_eq!(first.generation(), 1);
    /// assert_eq!(first, Rev::compute(None, false, br#"{"title":"milk"}"#)?);
    /// let second = Rev::compute(Some(&first), true, b"{}")?;
    /// assert_eq!(second.generation(), 2);
    /// # Ok::<(), ferry_core::rev::GenerationExhausted>(())
    /// ```
    pub fn compute(
        parent: Option<&Rev>,
        deleted: bool,
        canonical_body: &[u8],
    ) -> Result<Rev, GenerationExhausted> {
        let generation = match parent {
            None => 1,
            Some(parent) if parent.generation >= MAX_GENERATION => {
                return Err(GenerationExhausted {
                    parent: parent.clone(),
                });
            }
            Some(parent) => parent.generation + 1,
        };
        let mut hasher = Sha256::new();
        // Length-prefixed fields, so no two different inputs share an encoding.
        let parent_text = parent.map(Rev::to_string).unwrap_or_default();
        hasher.update((parent_text.len() as u64).to_be_bytes());
        hasher.update(parent_text.as_bytes());
        hasher.update([u8::from(deleted)]);
        hasher.update((canonical_body.len() as u64).to_be_bytes());
        hasher.update(canonical_body);
        let digest = hasher.finalize();
        // 128 bits, as many as CouchDB's MD5-based revision ids carry.
        let mut hash = String::with_capacity(32);
        for byte in &digest[..16] {
            hash.push(char::from_digit(u32::from(byte >> 4), 16).expect("nibble"));
            hash.push(char::from_digit(u32::from(byte & 0xf), 16).expect("nibble"));
        }
        Ok(Rev {
            generation,
            hash: hash.into(),
        })
    }

    /// The generation: 1 for a first revision, the parent's plus one otherwise.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The hash part, after the dash.
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

fn validate_generation(generation: u64) -> Result<(), &'static str> {
    if generation == 0 {
        Err("generation must be at least 1")
    } else if generation > MAX_GENERATION {
        Err("the generation is larger than 9007199254740991 (2^53 - 1)")
    } else {
        Ok(())
    }
}

fn validate_hash(hash: &str) -> Result<(), &'static str> {
    if hash.is_empty() {
        return Err("the hash after the dash is empty");
    }
    if hash.len() > MAX_REV_HASH_LEN {
        return Err("the hash is longer than 64 characters");
    }
    if !hash.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
        return Err("the hash must be ASCII letters and digits");
    }
    Ok(())
}

impl FromStr for Rev {
    type Err = RevParseError;

    fn from_str(text: &str) -> Result<Rev, RevParseError> {
        let refuse = |reason| RevParseError {
            text: truncate(text),
            reason,
        };
        let (generation, hash) = text
            .split_once('-')
            .ok_or_else(|| refuse("expected GENERATION-HASH"))?;
        if generation.is_empty() || !generation.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(refuse("the generation must be a positive integer"));
        }
        let generation: u64 = generation
            .parse()
            .map_err(|_| refuse("the generation is larger than 9007199254740991 (2^53 - 1)"))?;
        validate_generation(generation).map_err(refuse)?;
        validate_hash(hash).map_err(refuse)?;
        Ok(Rev {
            generation,
            hash: hash.into(),
        })
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}-{}", self.generation, self.hash)
    }
}

impl fmt::Debug for Rev {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{self}")
    }
}

impl Ord for Rev {
    fn cmp(&self, other: &Rev) -> Ordering {
        self.generation
            .cmp(&other.generation)
            .then_with(|| self.hash.as_bytes().cmp(other.hash.as_bytes()))
    }
}

impl PartialOrd for Rev {
    fn partial_cmp(&self, other: &Rev) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl serde::Serialize for Rev {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rev {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Rev, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_couchdb_revisions() {
        let rev: Rev = "12-967a00dff5e02add41819138abb3284d".parse().unwrap();
        assert_eq!(rev.generation(), 12);
        assert_eq!(rev.to_string(), "12-967a00dff5e02add41819138abb3284d");
    }

    #[test]
    fn refuses_malformed_revisions() {
        for bad in [
            "", "1", "-abc", "0-abc", "1-", "x-abc", "1-ab/c", "+1-abc", "1-é", " 1-a",
        ] {
            assert!(bad.parse::<Rev>().is_err(), "{bad:?} was accepted");
        }
        let too_long = format!("1-{}", "a".repeat(MAX_REV_HASH_LEN + 1));
        assert!(too_long.parse::<Rev>().is_err());
        let at_limit = format!("1-{}", "a".repeat(MAX_REV_HASH_LEN));
        assert!(at_limit.parse::<Rev>().is_ok());
        assert!("99999999999999999999999-a".parse::<Rev>().is_err());
    }

    #[test]
    fn the_largest_generation_is_read_but_has_no_child() {
        let largest: Rev = format!("{MAX_GENERATION}-a").parse().unwrap();
        assert_eq!(largest.generation(), MAX_GENERATION);
        for beyond in [MAX_GENERATION + 1, u64::MAX] {
            let error = format!("{beyond}-a").parse::<Rev>().unwrap_err();
            assert!(error.reason.contains("larger"), "{error}");
            assert!(Rev::new(beyond, "a").is_err());
        }
        assert_eq!(
            Rev::compute(Some(&largest), false, b"{}"),
            Err(GenerationExhausted {
                parent: largest.clone()
            })
        );
        let below: Rev = format!("{}-a", MAX_GENERATION - 1).parse().unwrap();
        let child = Rev::compute(Some(&below), false, b"{}").unwrap();
        assert_eq!(child.generation(), MAX_GENERATION);
        assert_eq!(child.to_string().parse::<Rev>(), Ok(child));
    }

    #[test]
    fn ordering_is_generation_then_hash_bytes() {
        let revs: Vec<Rev> = ["2-a", "10-a", "2-b", "2-B"]
            .iter()
            .map(|text| text.parse().unwrap())
            .collect();
        let mut sorted = revs.clone();
        sorted.sort();
        let printed: Vec<String> = sorted.iter().map(Rev::to_string).collect();
        assert_eq!(printed, ["2-B", "2-a", "2-b", "10-a"]);
    }

    #[test]
    fn hash_depends_on_every_input() {
        let body = br#"{"a":1}"#;
        let base = Rev::compute(None, false, body).unwrap();
        assert_ne!(base, Rev::compute(None, true, body).unwrap());
        assert_ne!(base, Rev::compute(None, false, br#"{"a":2}"#).unwrap());
        let child = Rev::compute(Some(&base), false, body).unwrap();
        assert_ne!(child.hash(), base.hash());
        assert_eq!(child.generation(), 2);
    }
}
