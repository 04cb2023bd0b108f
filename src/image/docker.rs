//! Legacy `docker save` archives: `manifest.json`, a config file and uncompressed layer
//! tars, checked against the config's `rootfs.diff_ids`.

use std::path::Path;

use oci_spec::image::ImageConfiguration;
use serde::Deserialize;

use super::oci::{
    apply_layer, check_config, image_config, parse_json, reference_matches, LayerCheck,
};
use super::store::{digest_hex, is_sha256_hex, sha256_hex, short_digest, Store};
use super::{ImageConfig, ImageError, Progress};

/// One image of `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ManifestEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

/// The image chosen in a docker save archive.
pub(crate) struct Resolved {
    /// The image ID: sha256 (hex) of the config.
    pub hex: String,
    pub entry: ManifestEntry,
    pub config: ImageConfiguration,
}

/// Whether the store holds a parseable docker `manifest.json`.
pub(crate) fn is_docker_save(store: &dyn Store) -> bool {
    store.exists("manifest.json")
        && store
            .read_small("manifest.json")
            .is_ok_and(|b| serde_json::from_slice::<Vec<ManifestEntry>>(&b).is_ok())
}

/// The hex digest a config file name promises: `<hex>.json` or `blobs/sha256/<hex>`.
fn named_digest(name: &str) -> Option<&str> {
    let base = name.rsplit('/').next()?;
    if let Some(hex) = base.strip_suffix(".json") {
        return is_sha256_hex(hex).then_some(hex);
    }
    let dir = name.strip_suffix(base)?.trim_end_matches('/');
    (dir.ends_with("blobs/sha256") && is_sha256_hex(base)).then_some(base)
}

/// Chooses the image (by `reference` among the RepoTags, or the only one) and reads and
/// checks its config. Reads nothing else.
pub(crate) fn resolve(store: &dyn Store, reference: Option<&str>) -> Result<Resolved, ImageError> {
    let entries: Vec<ManifestEntry> =
        parse_json(&store.read_small("manifest.json")?, "manifest.json")?;
    let tags = |e: &ManifestEntry| e.repo_tags.clone().unwrap_or_default();
    let all_tags = || {
        let t: Vec<String> = entries.iter().flat_map(tags).collect();
        if t.is_empty() {
            "no tags".to_string()
        } else {
            t.join(", ")
        }
    };
    let chosen: Vec<&ManifestEntry> = match reference {
        Some(r) => entries
            .iter()
            .filter(|e| tags(e).iter().any(|t| reference_matches(t, r)))
            .collect(),
        None => entries.iter().collect(),
    };
    let entry = match chosen[..] {
        [one] => one.clone(),
        [] if reference.is_some() => {
            return Err(ImageError::NoSuchReference {
                source_name: "manifest.json".into(),
                reference: reference.unwrap_or_default().to_string(),
                names: all_tags(),
            })
        }
        [] => {
            return Err(ImageError::Invalid {
                what: "manifest.json".into(),
                reason: "lists no images".into(),
            })
        }
        _ => return Err(ImageError::Ambiguous { names: all_tags() }),
    };
    let bytes = store.read_small(&entry.config)?;
    let hex = sha256_hex(&bytes);
    let what = format!("config {}", entry.config);
    if let Some(expected) = named_digest(&entry.config) {
        super::store::check_digest(&what, expected, None, (hex.clone(), bytes.len() as u64))?;
    }
    let config: ImageConfiguration = parse_json(&bytes, &what)?;
    check_config(&config, entry.layers.len(), &what)?;
    Ok(Resolved { hex, entry, config })
}

/// Applies the layers of the resolved image into `rootfs`.
pub(crate) fn unpack(
    store: &dyn Store,
    resolved: &Resolved,
    rootfs: &Path,
) -> Result<ImageConfig, ImageError> {
    let layers = &resolved.entry.layers;
    let diff_ids = resolved.config.rootfs().diff_ids();
    let total = layers.iter().filter_map(|l| store.size(l)).sum();
    let progress = Progress::new(total, "unpacking".into());
    for (i, (name, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
        let label = format!("layer {name}");
        let diff_hex = digest_hex(diff_id, &format!("config: diff_id {}", i + 1))?;
        progress.set_message(format!(
            "layer {}/{} ({})",
            i + 1,
            layers.len(),
            short_digest(diff_hex)
        ));
        let named = named_digest(name).filter(|_| !name.ends_with(".json"));
        let check = LayerCheck {
            blob: named.map(|h| (h, None)),
            diff_id: Some(diff_hex),
        };
        apply_layer(store, name, &check, &label, rootfs, &progress)?;
    }
    Ok(image_config(&resolved.config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_promise_digests() {
        let h = sha256_hex(b"x");
        assert_eq!(named_digest(&format!("{h}.json")), Some(h.as_str()));
        assert_eq!(named_digest(&format!("blobs/sha256/{h}")), Some(h.as_str()));
        assert_eq!(named_digest("config.json"), None);
        assert_eq!(named_digest(&format!("other/{h}")), None);
    }
}
