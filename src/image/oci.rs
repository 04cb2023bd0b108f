//! OCI image layouts (a directory or an archive of one): index → manifest → config and
//! layers, every blob checked against its digest.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::de::DeserializeOwned;

use super::layer::LayerWriter;
use super::store::{check_digest, digest_hex, short_digest, Compression, HashReader, Store};
use super::{ImageConfig, ImageError, Progress};

/// The annotation naming a manifest in an index.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and docker's) full image name annotation.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        what: what.to_string(),
        source,
    })
}

/// Whether `name` (a tag or full image name) is what the user asked for with `reference`.
pub(crate) fn reference_matches(name: &str, reference: &str) -> bool {
    name == reference
        || (!reference.contains(':') && name.ends_with(&format!(":{reference}")))
        || name.ends_with(&format!("/{reference}"))
}

/// The names of a manifest descriptor, for selection and messages.
fn names(desc: &Descriptor) -> Vec<String> {
    let Some(annotations) = desc.annotations() else {
        return Vec::new();
    };
    [REF_NAME, CONTAINERD_NAME]
        .iter()
        .filter_map(|k| annotations.get(*k).cloned())
        .collect()
}

fn is_linux_amd64(desc: &Descriptor) -> bool {
    desc.platform()
        .as_ref()
        .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == "amd64")
}

fn list_names(descs: &[Descriptor]) -> String {
    let shown: Vec<String> = descs
        .iter()
        .map(|d| {
            let names = names(d);
            match names.first() {
                Some(name) => name.clone(),
                None => d.digest().to_string(),
            }
        })
        .collect();
    if shown.is_empty() {
        "none".to_string()
    } else {
        shown.join(", ")
    }
}

/// Finds the image manifest to use: `reference` selects by name; otherwise the only
/// manifest of `index.json`, or the only linux/amd64 one. Returns its digest (hex) and
/// the manifest. Reads nothing but `index.json`, nested indexes and the manifest.
pub(crate) fn resolve(
    store: &dyn Store,
    reference: Option<&str>,
) -> Result<(String, ImageManifest), ImageError> {
    let index: ImageIndex = parse_json(&store.read_small("index.json")?, "index.json")?;
    let all = index.manifests();
    let mut candidates: Vec<&Descriptor> = all.iter().collect();
    if let Some(reference) = reference {
        candidates.retain(|d| names(d).iter().any(|n| reference_matches(n, reference)));
        if candidates.is_empty() {
            return Err(ImageError::NoSuchReference {
                source_name: "index.json".into(),
                reference: reference.to_string(),
                names: list_names(all),
            });
        }
    }
    let same_digest = candidates
        .windows(2)
        .all(|w| w[0].digest() == w[1].digest());
    let chosen = if candidates.len() == 1 || (!candidates.is_empty() && same_digest) {
        candidates[0]
    } else {
        let amd64: Vec<&Descriptor> = candidates
            .iter()
            .copied()
            .filter(|d| is_linux_amd64(d))
            .collect();
        match amd64[..] {
            [one] => one,
            _ if candidates.is_empty() => {
                return Err(ImageError::Invalid {
                    what: "index.json".into(),
                    reason: "lists no manifests".into(),
                })
            }
            _ => {
                let shown: Vec<Descriptor> = candidates.iter().map(|d| (*d).clone()).collect();
                return Err(ImageError::Ambiguous {
                    names: list_names(&shown),
                });
            }
        }
    };
    descend(store, chosen, 0)
}

/// Reads the image manifest `sha256:<hex>` of the store (the pull cache names its
/// manifests by digest, not through `index.json`).
pub(crate) fn manifest_by_digest(
    store: &dyn Store,
    hex: &str,
) -> Result<ImageManifest, ImageError> {
    let what = format!("manifest {}", short_digest(hex));
    let bytes = store.read_blob(hex, None, &what)?;
    parse_json(&bytes, &what)
}

/// Reads the manifest or index `desc` points to; an index is followed to its
/// linux/amd64 manifest.
fn descend(
    store: &dyn Store,
    desc: &Descriptor,
    depth: usize,
) -> Result<(String, ImageManifest), ImageError> {
    let digest = desc.digest().to_string();
    let hex = digest_hex(&digest, "manifest descriptor")?.to_string();
    let what = format!("manifest {}", short_digest(&hex));
    let bytes = store.read_blob(&hex, Some(desc.size()), &what)?;
    let value: serde_json::Value = parse_json(&bytes, &what)?;
    if value.get("manifests").is_none() {
        let manifest: ImageManifest = parse_json(&bytes, &what)?;
        return Ok((hex, manifest));
    }
    let what = format!("image index {}", short_digest(&hex));
    if depth >= MAX_INDEX_DEPTH {
        return Err(ImageError::Invalid {
            what,
            reason: "image indexes nest too deep".into(),
        });
    }
    let index: ImageIndex = parse_json(&bytes, &what)?;
    let manifests = index.manifests();
    let chosen = manifests
        .iter()
        .find(|d| is_linux_amd64(d))
        .or_else(|| match &manifests[..] {
            [only] if only.platform().is_none() => Some(only),
            _ => None,
        });
    match chosen {
        Some(desc) => descend(store, desc, depth + 1),
        None => {
            let platforms: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| format!("{}/{}", p.os(), p.architecture()))
                .collect();
            Err(ImageError::Invalid {
                what,
                reason: format!(
                    "no linux/amd64 manifest (it has {})",
                    if platforms.is_empty() {
                        "none".to_string()
                    } else {
                        platforms.join(", ")
                    }
                ),
            })
        }
    }
}

/// The config of a (docker or OCI) image config JSON document.
pub(crate) fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    match config.config() {
        Some(c) => ImageConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: non_empty(c.working_dir()),
            user: non_empty(c.user()),
        },
        None => ImageConfig {
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            user: None,
        },
    }
}

/// Refuses images that are not for linux/amd64 and configs whose layer count is wrong.
pub(crate) fn check_config(
    config: &ImageConfiguration,
    layers: usize,
    what: &str,
) -> Result<(), ImageError> {
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != "linux" || arch != "amd64" {
        return Err(ImageError::Unsupported {
            what: what.to_string(),
            detail: format!("platform {os}/{arch} (hearth runs linux/amd64)"),
        });
    }
    let diff_ids = config.rootfs().diff_ids().len();
    if diff_ids != layers {
        return Err(ImageError::Invalid {
            what: what.to_string(),
            reason: format!("{diff_ids} diff_ids for {layers} layers"),
        });
    }
    Ok(())
}

/// What a layer blob is expected to hash to.
pub(crate) struct LayerCheck<'a> {
    /// Digest (hex) and size of the blob as stored.
    pub blob: Option<(&'a str, Option<u64>)>,
    /// Digest (hex) of the uncompressed tar (the config's diff_id).
    pub diff_id: Option<&'a str>,
}

/// Streams one layer blob into `rootfs`: decompresses it when it is gzip (by content),
/// applies it, and checks the digests. A layer whose digest is wrong is reported as such
/// even when its content also fails to apply.
pub(crate) fn apply_layer(
    store: &dyn Store,
    name: &str,
    check: &LayerCheck<'_>,
    label: &str,
    rootfs: &Path,
    progress: &Progress,
) -> Result<(), ImageError> {
    let mut raw = HashReader::new(progress.wrap(store.open(name)?));
    let mut diff_hash = None;
    let applied = {
        let mut buffered = BufReader::with_capacity(256 << 10, &mut raw);
        let magic = buffered
            .fill_buf()
            .map_err(super::io_err(format!("{label}: cannot read")))?;
        let result = match Compression::of(magic) {
            Compression::Zstd => Err(ImageError::Unsupported {
                what: label.to_string(),
                detail: "zstd-compressed layer".into(),
            }),
            compression => {
                let mut decoded: Box<dyn Read + '_> = match compression {
                    Compression::Gzip => Box::new(MultiGzDecoder::new(&mut buffered)),
                    _ => Box::new(&mut buffered),
                };
                let mut tar = HashReader::new(&mut decoded);
                let mut writer = LayerWriter::new(rootfs, label.to_string(), true);
                let result = writer.apply_tar(&mut tar).and_then(|()| writer.finish());
                // The end of the tar stream (padding) counts towards the diff_id; after a
                // failure, a wrong digest is the better explanation.
                match tar.finish() {
                    Ok(hash) => diff_hash = Some(hash),
                    Err(e) if result.is_ok() => {
                        return Err(ImageError::Io {
                            what: format!("{label}: cannot read"),
                            source: e,
                        })
                    }
                    Err(_) => {}
                }
                result
            }
        };
        // Whatever happened, hash the rest of the blob to report a digest mismatch first.
        let drained = std::io::copy(&mut buffered, &mut std::io::sink());
        result.and(
            drained
                .map(|_| ())
                .map_err(super::io_err(format!("{label}: cannot read"))),
        )
    };
    let raw_hash = raw
        .finish()
        .map_err(super::io_err(format!("{label}: cannot read")))?;
    if let Some((hex, size)) = check.blob {
        check_digest(label, hex, size, raw_hash)?;
    }
    if let (Some(expected), Some(actual)) = (check.diff_id, diff_hash) {
        let what = match check.blob {
            Some(_) => format!("{label} (uncompressed)"),
            None => label.to_string(),
        };
        check_digest(&what, expected, None, actual)?;
    }
    applied
}

/// The layer media types hearth reads; zstd ones get a clear refusal.
fn check_layer_media_type(media_type: &MediaType, label: &str) -> Result<(), ImageError> {
    match media_type {
        MediaType::ImageLayer
        | MediaType::ImageLayerGzip
        | MediaType::ImageLayerNonDistributable
        | MediaType::ImageLayerNonDistributableGzip => Ok(()),
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
            Err(ImageError::Unsupported {
                what: label.to_string(),
                detail: format!(
                    "layer media type {media_type} (zstd; re-export the image with gzip layers)"
                ),
            })
        }
        MediaType::Other(s)
            if s.starts_with("application/vnd.docker.image.rootfs.")
                && (s.ends_with(".tar.gzip") || s.ends_with(".tar")) =>
        {
            Ok(())
        }
        other => Err(ImageError::Unsupported {
            what: label.to_string(),
            detail: format!("layer media type {other}"),
        }),
    }
}

/// Reads the config and applies every layer of `manifest` into `rootfs`.
pub(crate) fn unpack(
    store: &dyn Store,
    manifest: &ImageManifest,
    rootfs: &Path,
) -> Result<ImageConfig, ImageError> {
    let config_digest = manifest.config().digest().to_string();
    let config_hex = digest_hex(&config_digest, "config descriptor")?;
    let what = format!("config {}", short_digest(config_hex));
    let bytes = store.read_blob(config_hex, Some(manifest.config().size()), &what)?;
    let config: ImageConfiguration = parse_json(&bytes, &what)?;
    let layers = manifest.layers();
    check_config(&config, layers.len(), &what)?;

    let total = layers.iter().map(|l| l.size()).sum();
    let progress = Progress::new(total, "unpacking".into());
    for (i, (layer, diff_id)) in layers.iter().zip(config.rootfs().diff_ids()).enumerate() {
        let digest = layer.digest().to_string();
        let hex = digest_hex(&digest, &format!("layer {}", i + 1))?;
        let label = format!("layer {} ({})", i + 1, short_digest(hex));
        check_layer_media_type(layer.media_type(), &label)?;
        let diff_hex = digest_hex(diff_id, &format!("{what}: diff_id {}", i + 1))?;
        progress.set_message(format!("layer {}/{}", i + 1, layers.len()));
        let check = LayerCheck {
            blob: Some((hex, Some(layer.size()))),
            diff_id: Some(diff_hex),
        };
        apply_layer(
            store,
            &format!("blobs/sha256/{hex}"),
            &check,
            &label,
            rootfs,
            &progress,
        )?;
    }
    Ok(image_config(&config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert!(reference_matches("latest", "latest"));
        assert!(reference_matches(
            "docker.io/library/alpine:3.19",
            "alpine:3.19"
        ));
        assert!(reference_matches("busybox:latest", "latest"));
        assert!(!reference_matches("busybox:latest", "other:latest"));
        assert!(!reference_matches("v1", "latest"));
    }

    #[test]
    fn media_types() {
        assert!(check_layer_media_type(&MediaType::ImageLayerGzip, "l").is_ok());
        assert!(check_layer_media_type(
            &MediaType::Other("application/vnd.docker.image.rootfs.diff.tar.gzip".into()),
            "l"
        )
        .is_ok());
        let err = check_layer_media_type(&MediaType::ImageLayerZstd, "layer 1").unwrap_err();
        assert!(
            err.to_string().contains("unsupported layer media type"),
            "{err}"
        );
        assert!(err.to_string().contains("zstd"), "{err}");
    }
}
