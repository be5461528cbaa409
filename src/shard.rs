//! The leaf domain types that every layer shares: which DC, which shard, in what state.
//!
//! This file imports nothing from the rest of the crate, so config, routing, coordination and the
//! error edge can all use these types without depending on one another. It owns the one spelling
//! of a shard key outside the program: a residue as its number, the global shard as `"global"`,
//! in paths, JSON bodies and store keys alike.

use std::fmt;
use std::str::FromStr;

/// Index of a data center in the config's `datacenters`. Routing state refers to DCs by index so
/// that the request path compares integers, not names.
pub type DcId = usize;

/// A shard's version: grows whenever its owner or state changes.
pub type Epoch = u64;

/// A shard: the residue `id mod increment` of its clusters, or the global shard (writes that
/// name no cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShardKey {
    Residue(u64),
    Global,
}

const GLOBAL: &str = "global";

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Residue(r) => write!(f, "{r}"),
            Self::Global => f.write_str(GLOBAL),
        }
    }
}

/// Not a residue (decimal digits) or `global`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a shard: use a residue or \"global\"")]
pub struct BadShardKey(pub String);

impl FromStr for ShardKey {
    type Err = BadShardKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == GLOBAL {
            return Ok(Self::Global);
        }
        // `u64::from_str` takes a leading '+'; a shard key is digits only.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadShardKey(s.to_owned()));
        }
        s.parse()
            .map(Self::Residue)
            .map_err(|_| BadShardKey(s.to_owned()))
    }
}

/// In JSON a residue is a number and the global shard the string `"global"`.
impl serde::Serialize for ShardKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Residue(r) => serializer.serialize_u64(*r),
            Self::Global => serializer.serialize_str(GLOBAL),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ShardKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Residue(u64),
            Name(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Residue(r) => Ok(Self::Residue(r)),
            Raw::Name(name) if name == GLOBAL => Ok(Self::Global),
            Raw::Name(name) => Err(serde::de::Error::custom(BadShardKey(name))),
        }
    }
}

/// Whether a shard's owner admits writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    /// The owner admits writes.
    Active,
    /// Nobody admits writes: a move in progress.
    Fenced,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Fenced => "fenced",
        }
    }
}

impl FromStr for ShardState {
    type Err = ();

    /// The words of [`ShardState::as_str`], and nothing else.
    fn from_str(s: &str) -> Result<Self, ()> {
        [Self::Active, Self::Fenced]
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_key_is_a_residue_or_global_in_text_and_json() {
        for (text, key) in [("3", ShardKey::Residue(3)), ("global", ShardKey::Global)] {
            assert_eq!(text.parse::<ShardKey>(), Ok(key));
            assert_eq!(key.to_string(), text);
        }
        for bad in ["", "+3", "-1", "Global", "3x", "99999999999999999999"] {
            assert!(bad.parse::<ShardKey>().is_err(), "{bad:?}");
        }
        assert_eq!(
            serde_json::to_string(&[ShardKey::Residue(2), ShardKey::Global]).unwrap(),
            r#"[2,"global"]"#
        );
        let back: Vec<ShardKey> = serde_json::from_str(r#"[2,"global"]"#).unwrap();
        assert_eq!(back, [ShardKey::Residue(2), ShardKey::Global]);
        assert!(serde_json::from_str::<ShardKey>(r#""north""#).is_err());
        assert_eq!(
            serde_json::to_string(&ShardState::Fenced).unwrap(),
            r#""fenced""#
        );
    }
}
