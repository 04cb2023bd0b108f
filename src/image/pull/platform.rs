//! `--platform OS/ARCH[/VARIANT]` and picking a manifest from an image index by it.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageIndex};

use super::PullError;

/// A platform as docker writes it: `linux/amd64`, `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    /// What hearth's guests run.
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = PullError;

    fn from_str(text: &str) -> Result<Self, PullError> {
        let parts: Vec<&str> = text.split('/').collect();
        let bad = || PullError::BadPlatform(text.to_string());
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts[..] {
            [os, architecture] => Ok(Platform {
                os: os.to_string(),
                architecture: architecture.to_string(),
                variant: None,
            }),
            [os, architecture, variant] => Ok(Platform {
                os: os.to_string(),
                architecture: architecture.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl Platform {
    pub(super) fn of(desc: &Descriptor) -> Option<Platform> {
        let p = desc.platform().as_ref()?;
        Some(Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone().filter(|v| !v.is_empty()),
        })
    }

    /// Whether an index entry for `other` serves this platform. No variant asked means
    /// any; arm64's only variant, v8, is often left out of indexes.
    fn accepts(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        match (&self.variant, &other.variant) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(want), None) => self.architecture == "arm64" && want == "v8",
        }
    }
}

/// The manifest of `index` for `want`; the error lists the platforms the index has
/// (attestation entries, `unknown/unknown`, left out).
pub fn select<'a>(index: &'a ImageIndex, want: &Platform) -> Result<&'a Descriptor, PullError> {
    let entries = index.manifests();
    if let Some(found) = entries
        .iter()
        .find(|d| Platform::of(d).is_some_and(|p| want.accepts(&p)))
    {
        return Ok(found);
    }
    let mut have: Vec<String> = entries
        .iter()
        .filter_map(Platform::of)
        .filter(|p| p.os != "unknown")
        .map(|p| p.to_string())
        .collect();
    have.dedup();
    Err(PullError::NoPlatform {
        want: want.to_string(),
        have: if have.is_empty() {
            "none".into()
        } else {
            have.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut platform = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    platform["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", format!("{i:x}").repeat(64)),
                    "size": 100,
                    "platform": platform,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap()
    }

    fn digest_of(i: usize) -> String {
        format!("sha256:{}", format!("{i:x}").repeat(64))
    }

    #[test]
    fn parse_and_show() {
        assert_eq!(
            "linux/amd64".parse::<Platform>().unwrap(),
            Platform::default()
        );
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(arm.variant.as_deref(), Some("v7"));
        assert_eq!(arm.to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn selection() {
        let idx = index(&[
            ("linux", "arm", Some("v7")),
            ("linux", "arm64", Some("v8")),
            ("linux", "amd64", None),
            ("unknown", "unknown", None),
        ]);
        let pick = |p: &str| {
            select(&idx, &p.parse().unwrap())
                .map(|d| d.digest().to_string())
                .map_err(|e| e.to_string())
        };
        assert_eq!(pick("linux/amd64"), Ok(digest_of(2)));
        assert_eq!(pick("linux/arm64"), Ok(digest_of(1)));
        assert_eq!(pick("linux/arm64/v8"), Ok(digest_of(1)));
        assert_eq!(pick("linux/arm/v7"), Ok(digest_of(0)));
        assert_eq!(
            pick("linux/arm/v6"),
            Err("the image has no linux/arm/v6 manifest (it has linux/arm/v7, linux/arm64/v8, linux/amd64)".into())
        );
        let no_variant = index(&[("linux", "arm64", None)]);
        assert!(select(&no_variant, &"linux/arm64/v8".parse().unwrap()).is_ok());
        assert!(select(&no_variant, &Platform::default()).is_err());
    }
}
