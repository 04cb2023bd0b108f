//! Registry credentials from docker's and podman's auth file (`config.json` /
//! `auth.json`: `{"auths": {"HOST": {"auth": base64("user:pass")}}}`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::PullError;

#[derive(Debug, Default, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// A user name and password for one registry, and the file they came from (for messages).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub file: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// The auth file to read: `$REGISTRY_AUTH_FILE` (which must exist), else
/// `~/.docker/config.json` when there is one.
fn auth_file(
    explicit: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<(PathBuf, bool)> {
    if let Some(path) = explicit.filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(path), true));
    }
    let path = PathBuf::from(home.filter(|h| !h.is_empty())?).join(".docker/config.json");
    path.is_file().then_some((path, false))
}

/// Docker Hub is filed under several names (`https://index.docker.io/v1/` by docker
/// login); a key is reduced to its host and port.
fn normalize_key(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        other => other,
    }
}

/// The credentials for `registry` (as in a reference: `docker.io`, `HOST:PORT`) in the
/// auth file's contents `json`, read from `file`.
fn find(json: &[u8], file: &Path, registry: &str) -> Result<Option<Credentials>, PullError> {
    let bad = |reason: String| PullError::AuthFile {
        file: file.to_path_buf(),
        reason,
    };
    let parsed: AuthFile =
        serde_json::from_slice(json).map_err(|e| bad(format!("invalid JSON ({e})")))?;
    let Some((key, entry)) = parsed
        .auths
        .iter()
        .find(|(key, _)| normalize_key(key) == normalize_key(registry))
    else {
        return Ok(None);
    };
    let (username, password) = match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad(format!("auths.{key}.auth is not base64")))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| bad(format!("auths.{key}.auth is not UTF-8")))?;
            let (user, pass) = text
                .split_once(':')
                .ok_or_else(|| bad(format!("auths.{key}.auth is not user:password")))?;
            (user.to_string(), pass.to_string())
        }
        (_, Some(user), Some(pass)) => (user.clone(), pass.clone()),
        // An entry without a secret (a credential helper's placeholder): nothing to use.
        _ => return Ok(None),
    };
    Ok(Some(Credentials {
        username,
        password,
        file: file.to_path_buf(),
    }))
}

/// The credentials for `registry` from the user's auth file, or `None` (anonymous).
pub fn lookup(registry: &str) -> Result<Option<Credentials>, PullError> {
    let Some((file, explicit)) = auth_file(
        std::env::var_os("REGISTRY_AUTH_FILE"),
        std::env::var_os("HOME"),
    ) else {
        return Ok(None);
    };
    match std::fs::read(&file) {
        Ok(json) => find(&json, &file, registry),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PullError::AuthFile {
            file,
            reason: format!("cannot read it ({e})"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(json: &str, registry: &str) -> Result<Option<(String, String)>, String> {
        find(json.as_bytes(), Path::new("auth.json"), registry)
            .map(|c| c.map(|c| (c.username, c.password)))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn entries() {
        // "alice:s3cr:et" in base64: only the first ':' separates.
        let json = r#"{"auths": {
            "127.0.0.1:5000": {"auth": "YWxpY2U6czNjcjpldA=="},
            "https://index.docker.io/v1/": {"auth": "Ym9iOnB3"},
            "reg.lan": {"username": "carol", "password": "pw2"},
            "helper.lan": {}
        }, "credsStore": "desktop"}"#;
        let pair = |u: &str, p: &str| Ok(Some((u.to_string(), p.to_string())));
        assert_eq!(creds(json, "127.0.0.1:5000"), pair("alice", "s3cr:et"));
        assert_eq!(creds(json, "docker.io"), pair("bob", "pw"));
        assert_eq!(creds(json, "index.docker.io"), pair("bob", "pw"));
        assert_eq!(creds(json, "reg.lan"), pair("carol", "pw2"));
        assert_eq!(creds(json, "helper.lan"), Ok(None));
        assert_eq!(creds(json, "127.0.0.1:5001"), Ok(None));
        assert_eq!(creds("{}", "docker.io"), Ok(None));
    }

    #[test]
    fn malformed() {
        let err = creds("{", "x").unwrap_err();
        assert!(
            err.starts_with("auth file auth.json: invalid JSON"),
            "{err}"
        );
        let err = creds(r#"{"auths": {"x": {"auth": "!!"}}}"#, "x").unwrap_err();
        assert_eq!(err, "auth file auth.json: auths.x.auth is not base64");
        // base64("nocolon")
        let err = creds(r#"{"auths": {"x": {"auth": "bm9jb2xvbg=="}}}"#, "x").unwrap_err();
        assert_eq!(
            err,
            "auth file auth.json: auths.x.auth is not user:password"
        );
    }

    #[test]
    fn which_file() {
        let home = std::env::temp_dir().join(format!("hearth-auth-{}", std::process::id()));
        let config = home.join(".docker/config.json");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        assert_eq!(auth_file(None, Some(home.clone().into())), None);
        std::fs::write(&config, "{}").unwrap();
        assert_eq!(
            auth_file(None, Some(home.clone().into())),
            Some((config.clone(), false))
        );
        assert_eq!(
            auth_file(Some("/x/auth.json".into()), Some(home.clone().into())),
            Some((PathBuf::from("/x/auth.json"), true))
        );
        assert_eq!(auth_file(None, None), None);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
