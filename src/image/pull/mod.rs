//! Pulling images from registries: `hearth pull REF` and `hearth container run REF`.
//!
//! The registry protocol (token and basic auth, manifests, blobs) is the `oci-client`
//! crate's; this module decides what to fetch and keeps it: an image index is resolved to
//! one platform here, every blob is hashed while it is written and only verified blobs get
//! a name in the pull cache ([`Layout`], an OCI image layout), so what
//! [`crate::image::prepare_pulled`] unpacks is exactly what an archive of the same image
//! would give. The crate's async client runs on a current-thread tokio runtime created
//! for the pull and gone when it returns; nothing else in hearth is async.

mod args;
mod auth;
mod layout;
mod platform;
mod reference;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest};

pub use args::{PullArgs, PullPolicyArg, RegistryArgs};
pub use layout::Layout;
pub use platform::Platform;
pub use reference::plain_http;

use layout::sha256_hex;

/// How many blobs download at once.
const CONCURRENT_DOWNLOADS: usize = 3;

/// What the registry may answer a manifest request with.
const MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

/// Everything that can go wrong while pulling. Messages name the registry or reference
/// and fit on one line.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("invalid platform {0:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")]
    BadPlatform(String),
    #[error("unsupported digest {0:?} (only sha256)")]
    BadDigest(String),
    #[error("auth file {}: {reason}", file.display())]
    AuthFile { file: PathBuf, reason: String },
    #[error("{registry}: authentication required (401 Unauthorized): {hint}")]
    Unauthorized { registry: String, hint: String },
    #[error("{reference}: manifest unknown (no such tag or digest in {registry})")]
    ManifestUnknown { reference: String, registry: String },
    #[error("the image has no {want} manifest (it has {have})")]
    NoPlatform { want: String, have: String },
    #[error("blob {digest} from {source_name}: digest mismatch (got {actual})")]
    DigestMismatch {
        digest: String,
        source_name: String,
        actual: String,
    },
    #[error(
        "blob {digest} from {source_name}: size mismatch (expected {expected} bytes, got {actual})"
    )]
    BlobSize {
        digest: String,
        source_name: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: {reason}")]
    Unsupported { what: String, reason: String },
    #[error("{what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// Anything else the registry client reports (network, TLS, server errors).
    #[error("{what}")]
    Registry {
        what: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{what}")]
    Download {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0} has not been pulled (and --pull never was given)")]
    NotPulled(String),
    #[error("no image cache directory: set HEARTH_CACHE or HOME")]
    NoCacheDir,
}

/// When to contact the registry (docker's `--pull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Always ask for the manifest; blobs already cached are not downloaded again.
    Always,
    /// Use the cached image of this reference and platform if it is complete.
    #[default]
    Missing,
    /// Only the cache; an image not pulled before is an error.
    Never,
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub platform: Platform,
    /// Registries spoken to in plain HTTP besides loopback ones: `HOST` or `HOST:PORT`.
    pub insecure_registries: Vec<String>,
    /// No progress output at all.
    pub quiet: bool,
}

/// An image in the pull cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The full reference (`docker.io/library/busybox:latest`).
    pub name: String,
    /// What the reference points to in the registry: the index digest of a multi-platform
    /// image, else the manifest digest (docker's "Digest:"). An image found in the cache
    /// without asking the registry has only its manifest digest here.
    pub digest: String,
    /// The image manifest for the platform.
    pub manifest_digest: String,
    /// Blobs downloaded by this pull (0 when everything was cached).
    pub downloaded: usize,
    /// The pull cache (an OCI image layout).
    pub layout: PathBuf,
}

/// Whether `text` is a well-formed image reference.
pub fn is_reference(text: &str) -> bool {
    reference::parse(text).is_ok()
}

/// Returns the image `text` names for `options.platform`, pulling it as `policy` says.
pub fn resolve(
    text: &str,
    options: &PullOptions,
    policy: PullPolicy,
    layout: &Layout,
) -> Result<Pulled, PullError> {
    let reference = reference::parse(text)?;
    let name = reference.to_string();
    layout.open()?;
    if policy != PullPolicy::Always {
        if let Some(desc) = layout.find(&name, &options.platform)? {
            let manifest_digest = desc.digest().to_string();
            if cached_completely(layout, &manifest_digest) {
                return Ok(Pulled {
                    name,
                    digest: manifest_digest.clone(),
                    manifest_digest,
                    downloaded: 0,
                    layout: layout.root().to_path_buf(),
                });
            }
        }
        if policy == PullPolicy::Never {
            return Err(PullError::NotPulled(name));
        }
    }
    pull(&reference, options, layout)
}

/// Whether the manifest and every blob it names are in the cache.
fn cached_completely(layout: &Layout, manifest_digest: &str) -> bool {
    let Ok(hex) = sha256_hex(manifest_digest) else {
        return false;
    };
    let Ok(bytes) = std::fs::read(layout.blob_path(hex)) else {
        return false;
    };
    let Ok(manifest) = serde_json::from_slice::<ImageManifest>(&bytes) else {
        return false;
    };
    std::iter::once(manifest.config())
        .chain(manifest.layers())
        .all(|d| sha256_hex(d.digest().as_ref()).is_ok_and(|h| layout.has_blob(h, Some(d.size()))))
}

/// Fetches the manifest of `reference` and whatever blobs of it are not cached yet.
pub fn pull(
    reference: &Reference,
    options: &PullOptions,
    layout: &Layout,
) -> Result<Pulled, PullError> {
    layout.open()?;
    let registry = reference.registry().to_string();
    let credentials = auth::lookup(&registry)?;
    let auth = match &credentials {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    // reqwest is built without a default crypto provider, so that hearth needs no
    // aws-lc (C and cmake) build; ring it is, with the classic key exchanges registries
    // speak. Installing twice fails harmlessly.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resolved = reference.resolve_registry().to_string();
    let protocol = if plain_http(&resolved, &options.insecure_registries) {
        ClientProtocol::HttpsExcept(vec![resolved])
    } else {
        ClientProtocol::Https
    };
    let config = ClientConfig {
        protocol,
        // Index resolution is ours (see `platform`).
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(30)),
        read_timeout: Some(Duration::from_secs(120)),
        user_agent: concat!("hearth/", env!("CARGO_PKG_VERSION")),
        https_proxy: proxy_env(&["HTTPS_PROXY", "https_proxy"]),
        http_proxy: proxy_env(&["HTTP_PROXY", "http_proxy"]),
        no_proxy: proxy_env(&["NO_PROXY", "no_proxy"]),
        ..ClientConfig::default()
    };
    let client = Client::try_from(config).map_err(|source| PullError::Registry {
        what: "cannot set up the registry client".into(),
        source,
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PullError::Io {
            what: "cannot start the network runtime".into(),
            source,
        })?;
    let job = Job {
        client,
        reference,
        auth,
        credentials,
        registry,
        options,
        layout,
        progress: Progress::new(options.quiet),
    };
    runtime.block_on(job.run())
}

fn proxy_env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// One pull in progress.
struct Job<'a> {
    client: Client,
    reference: &'a Reference,
    auth: RegistryAuth,
    credentials: Option<auth::Credentials>,
    /// The registry as the reference names it, for messages.
    registry: String,
    options: &'a PullOptions,
    layout: &'a Layout,
    progress: Progress,
}

impl Job<'_> {
    async fn run(self) -> Result<Pulled, PullError> {
        let name = self.reference.to_string();
        let (top, top_digest) = self.fetch_manifest(self.reference).await?;
        let (manifest_bytes, manifest_digest, media_type) = if is_index(&top) {
            let index: ImageIndex = self.parse(&top, &top_digest)?;
            self.layout.put_blob(&top_digest, &top, &self.registry)?;
            let chosen = platform::select(&index, &self.options.platform)?;
            let digest = chosen.digest().to_string();
            let by_digest = self.reference.clone_with_digest(digest.clone());
            let (bytes, got) = self.fetch_manifest(&by_digest).await?;
            if got != digest {
                return Err(PullError::DigestMismatch {
                    digest,
                    source_name: self.registry.clone(),
                    actual: got,
                });
            }
            (bytes, digest, chosen.media_type().to_string())
        } else {
            let media_type = media_type_of(&top).unwrap_or(OCI_IMAGE_MEDIA_TYPE.into());
            (top, top_digest.clone(), media_type)
        };
        let manifest: ImageManifest = self.parse(&manifest_bytes, &manifest_digest)?;
        self.layout
            .put_blob(&manifest_digest, &manifest_bytes, &self.registry)?;

        let blobs: Vec<(String, u64)> = std::iter::once(manifest.config())
            .chain(manifest.layers())
            .map(|d| (d.digest().to_string(), d.size()))
            .collect();
        let downloaded: Vec<bool> = futures_util::stream::iter(blobs)
            .map(|(digest, size)| self.fetch_blob(digest, size))
            .buffered(CONCURRENT_DOWNLOADS)
            .try_collect()
            .await?;
        self.layout.record(
            &name,
            &self.options.platform,
            &manifest_digest,
            manifest_bytes.len() as u64,
            &media_type,
        )?;
        Ok(Pulled {
            name,
            digest: top_digest,
            manifest_digest,
            downloaded: downloaded.into_iter().filter(|d| *d).count(),
            layout: self.layout.root().to_path_buf(),
        })
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        bytes: &[u8],
        digest: &str,
    ) -> Result<T, PullError> {
        serde_json::from_slice(bytes).map_err(|e| PullError::Unsupported {
            what: format!("manifest {digest} from {}", self.registry),
            reason: format!("not an OCI or docker v2 manifest ({e})"),
        })
    }

    /// The manifest `reference` names and its digest, computed here from the bytes (and
    /// checked against the reference's digest, if it has one).
    async fn fetch_manifest(&self, reference: &Reference) -> Result<(Vec<u8>, String), PullError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, MANIFEST_TYPES)
            .await
            .map_err(|e| self.registry_error(e, reference))?;
        let digest = format!("sha256:{}", crate::image::store::sha256_hex(&bytes));
        if let Some(wanted) = reference.digest() {
            if wanted != digest {
                return Err(PullError::DigestMismatch {
                    digest: wanted.to_string(),
                    source_name: self.registry.clone(),
                    actual: digest,
                });
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    /// Downloads one blob unless it is cached; whether it was downloaded.
    async fn fetch_blob(&self, digest: String, size: u64) -> Result<bool, PullError> {
        let hex = sha256_hex(&digest)?;
        let label = hex[..12].to_string();
        if self.layout.has_blob(hex, Some(size)) {
            self.progress.line(&label, "Already exists");
            return Ok(false);
        }
        let mut writer = self.layout.new_blob(&digest, Some(size), &self.registry)?;
        let mut stream = self
            .client
            .pull_blob_stream(self.reference, digest.as_str())
            .await
            .map_err(|e| self.registry_error(e, self.reference))?;
        let bar = self.progress.bar(&label, size);
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    writer.write(&bytes)?;
                    bar.inc(bytes.len() as u64);
                }
                Err(e) => {
                    // The crate checks the digest too and fails at the end of the stream;
                    // say it in our words, with what arrived.
                    let actual = writer.digest_so_far();
                    if is_digest_error(&e) && actual != digest {
                        return Err(PullError::DigestMismatch {
                            digest,
                            source_name: self.registry.clone(),
                            actual,
                        });
                    }
                    return Err(PullError::Download {
                        what: format!("blob {digest} from {}", self.registry),
                        source: e,
                    });
                }
            }
        }
        writer.commit()?;
        bar.finish_and_clear();
        self.progress.line(&label, "Pull complete");
        Ok(true)
    }

    fn registry_error(&self, error: OciDistributionError, reference: &Reference) -> PullError {
        let registry = self.registry.clone();
        let unauthorized = |detail: Option<String>| {
            let hint = match (&self.credentials, detail) {
                (_, Some(detail)) => detail,
                (Some(c), None) => format!(
                    "the credentials of {} for {registry} were refused",
                    c.file.display()
                ),
                (None, None) => format!(
                    "no credentials for {registry} (log in with docker or podman, or set \
                     REGISTRY_AUTH_FILE)"
                ),
            };
            PullError::Unauthorized {
                registry: registry.clone(),
                hint,
            }
        };
        let unknown = || PullError::ManifestUnknown {
            reference: reference.to_string(),
            registry: registry.clone(),
        };
        match error {
            OciDistributionError::UnauthorizedError { .. } => unauthorized(None),
            OciDistributionError::AuthenticationFailure(reason) => {
                unauthorized(Some(format!("token request refused: {}", reason.trim())))
            }
            OciDistributionError::ServerError { code: 401, .. } => unauthorized(None),
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => unknown(),
            OciDistributionError::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                    )
                }) =>
            {
                unknown()
            }
            OciDistributionError::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)
                }) =>
            {
                unauthorized(None)
            }
            source => PullError::Registry {
                what: format!("cannot pull {reference} from {registry}"),
                source,
            },
        }
    }
}

fn is_digest_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
}

fn media_type_of(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value.get("mediaType")?.as_str().map(str::to_string)
}

/// An image index or docker manifest list, by media type or (when that is left out, as
/// the OCI spec allows) by shape.
fn is_index(bytes: &[u8]) -> bool {
    match media_type_of(bytes).as_deref() {
        Some(OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE) => true,
        Some(_) => false,
        None => serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some()),
    }
}

/// Per-blob progress: bars on a terminal, one line per blob otherwise, or nothing.
enum Progress {
    Quiet,
    Lines,
    Bars(MultiProgress),
}

impl Progress {
    fn new(quiet: bool) -> Self {
        if quiet {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            Progress::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Progress::Lines
        }
    }

    fn line(&self, label: &str, what: &str) {
        match self {
            Progress::Quiet => {}
            Progress::Lines => {
                let _ = writeln!(std::io::stderr(), "{label}: {what}");
            }
            Progress::Bars(multi) => {
                let _ = multi.println(format!("{label}: {what}"));
            }
        }
    }

    fn bar(&self, label: &str, size: u64) -> ProgressBar {
        let Progress::Bars(multi) = self else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new(size));
        if let Ok(style) =
            ProgressStyle::with_template("{msg}: [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        bar
    }
}

/// `hearth pull`: pulls `text` and prints docker's summary (the digest, whether anything
/// was new, the full name) on stdout; with `quiet`, only the name.
pub fn command(text: &str, options: &PullOptions) -> Result<(), PullError> {
    let layout = Layout::default_location()?;
    let pulled = resolve(text, options, PullPolicy::Always, &layout)?;
    let mut out = std::io::stdout().lock();
    let result = if options.quiet {
        writeln!(out, "{}", pulled.name)
    } else {
        let status = if pulled.downloaded > 0 {
            "Downloaded newer image for"
        } else {
            "Image is up to date for"
        };
        writeln!(
            out,
            "Digest: {}\nStatus: {status} {}\n{}",
            pulled.digest, pulled.name, pulled.name
        )
    };
    result.map_err(|source| PullError::Io {
        what: "cannot write to stdout".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_detection() {
        assert!(is_index(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#
        ));
        assert!(is_index(
            br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#
        ));
        assert!(is_index(br#"{"schemaVersion":2,"manifests":[]}"#));
        assert!(!is_index(
            br#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#
        ));
        assert!(!is_index(br#"{"schemaVersion":2,"layers":[]}"#));
        assert!(!is_index(b"not json"));
    }

    #[test]
    fn cache_only_policy() {
        let dir = std::env::temp_dir().join(format!("hearth-pull-never-{}", std::process::id()));
        let layout = Layout::at(dir.clone());
        let err = resolve(
            "127.0.0.1:1/x:y",
            &PullOptions::default(),
            PullPolicy::Never,
            &layout,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "image 127.0.0.1:1/x:y has not been pulled (and --pull never was given)"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
