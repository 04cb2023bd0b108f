//! Image references as docker spells them, and which registries are spoken to in plain
//! HTTP.
//!
//! Parsing and docker's defaults (`docker.io`, `library/`, `:latest`) are oci-spec's
//! `Reference`, a port of the distribution project's Go parser; this file adds what hearth
//! decides on top of it.

use std::net::Ipv4Addr;

use oci_client::Reference;

use super::PullError;

/// Parses `text` with docker's defaults: `alpine` is `docker.io/library/alpine:latest`.
pub fn parse(text: &str) -> Result<Reference, PullError> {
    text.parse::<Reference>()
        .map_err(|source| PullError::BadReference {
            reference: text.to_string(),
            reason: source.to_string(),
        })
}

/// The host of `registry` (`HOST`, `HOST:PORT`, `[V6]:PORT`), without the port.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// Whether `registry` is spoken to in plain HTTP: loopback registries always (docker's
/// rule: `localhost`, 127.0.0.0/8, `::1`), and those named by `insecure`, each `HOST`
/// (any port) or `HOST:PORT`.
pub fn plain_http(registry: &str, insecure: &[String]) -> bool {
    let host = host_of(registry);
    let loopback = host == "localhost"
        || host == "::1"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    loopback
        || insecure.iter().any(|entry| {
            let entry = entry.trim_end_matches('/');
            let entry = entry
                .strip_prefix("http://")
                .or_else(|| entry.strip_prefix("https://"))
                .unwrap_or(entry);
            entry == registry || (entry == host && !entry.contains(':'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_defaults() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let cases = [
            (
                "alpine",
                "docker.io",
                "library/alpine",
                Some("latest"),
                None,
            ),
            (
                "alpine:3.20",
                "docker.io",
                "library/alpine",
                Some("3.20"),
                None,
            ),
            ("user/app", "docker.io", "user/app", Some("latest"), None),
            (
                "index.docker.io/library/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
            ),
            ("localhost:5000/x:y", "localhost:5000", "x", Some("y"), None),
            ("localhost/x", "localhost", "x", Some("latest"), None),
            (
                "127.0.0.1:5000/a/b/c",
                "127.0.0.1:5000",
                "a/b/c",
                Some("latest"),
                None,
            ),
            ("ghcr.io/o/n:v1", "ghcr.io", "o/n", Some("v1"), None),
            // A first component without '.', ':' or "localhost" is a path, not a host.
            ("myhost/x", "docker.io", "myhost/x", Some("latest"), None),
        ];
        for (text, registry, repository, tag, digest_part) in cases {
            let r = parse(text).unwrap();
            assert_eq!(r.registry(), registry, "{text}");
            assert_eq!(r.repository(), repository, "{text}");
            assert_eq!(r.tag(), tag, "{text}");
            assert_eq!(r.digest(), digest_part, "{text}");
        }
        let by_digest = parse(&format!("ghcr.io/o/n@{digest}")).unwrap();
        assert_eq!(by_digest.tag(), None);
        assert_eq!(by_digest.digest(), Some(digest.as_str()));
        assert_eq!(by_digest.to_string(), format!("ghcr.io/o/n@{digest}"));
        let both = parse(&format!("busybox:1.36@{digest}")).unwrap();
        assert_eq!(both.tag(), Some("1.36"));
        assert_eq!(
            both.to_string(),
            format!("docker.io/library/busybox:1.36@{digest}")
        );
        assert_eq!(
            parse("alpine").unwrap().to_string(),
            "docker.io/library/alpine:latest"
        );
    }

    #[test]
    fn bad_references() {
        for text in [
            "",
            "Alpine",
            "a:b:c",
            "x@sha256:12",
            "x@md5:00",
            "/x",
            "x//y",
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid image reference"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn plain_http_rule() {
        let none: Vec<String> = Vec::new();
        assert!(plain_http("localhost:5000", &none));
        assert!(plain_http("localhost", &none));
        assert!(plain_http("127.0.0.1:5000", &none));
        assert!(plain_http("127.1.2.3", &none));
        assert!(plain_http("[::1]:5000", &none));
        assert!(!plain_http("docker.io", &none));
        assert!(!plain_http("10.0.0.1:5000", &none));
        assert!(!plain_http("localhost.example.com", &none));

        let listed = vec!["reg.lan".to_string(), "10.0.0.1:5000".to_string()];
        assert!(plain_http("reg.lan", &listed));
        assert!(plain_http("reg.lan:8080", &listed));
        assert!(plain_http("10.0.0.1:5000", &listed));
        assert!(!plain_http("10.0.0.1:5001", &listed));
        assert!(!plain_http("10.0.0.1", &listed));
        assert!(!plain_http("other.lan", &listed));
        assert!(plain_http("reg.lan", &["http://reg.lan/".to_string()]));
    }
}
