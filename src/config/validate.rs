//! Validation of a loaded configuration: every error names the key at fault. Secrets
//! given as files are read here.

use super::load::{invalid, ConfigError};
use super::{Backend, Config, Secret, UpstreamConfig, DOCKER_HUB_URL};
use std::net::SocketAddr;
use std::path::Path;

pub(super) fn validate(config: &mut Config) -> Result<(), ConfigError> {
    config.server.listen.parse::<SocketAddr>().map_err(|e| {
        invalid(
            "server.listen",
            format!("{:?} is not host:port ({e})", config.server.listen),
        )
    })?;
    if config.server.data_dir.as_os_str().is_empty() {
        return Err(invalid("server.data_dir", "must not be empty"));
    }
    for (key, d) in [
        ("server.header_timeout", config.server.header_timeout),
        ("server.idle_timeout", config.server.idle_timeout),
        ("server.send_timeout", config.server.send_timeout),
        ("proxy.connect_timeout", config.proxy.connect_timeout),
        ("proxy.read_timeout", config.proxy.read_timeout),
        ("proxy.revalidate_timeout", config.proxy.revalidate_timeout),
    ] {
        if d.is_zero() {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    if let Some(tls) = &config.server.tls {
        if tls.client_auth.is_some() && tls.client_ca_file.is_none() {
            return Err(invalid(
                "server.tls.client_auth",
                "needs server.tls.client_ca_file, the CA that client certificates must chain to",
            ));
        }
    }
    // Past a million the file-descriptor limit of any common system is the bound anyway.
    if config.server.max_connections == 0 || config.server.max_connections > 1_000_000 {
        return Err(invalid("server.max_connections", "must be between 1 and 1000000"));
    }
    if !matches!(config.log.format.as_str(), "text" | "json") {
        return Err(invalid(
            "log.format",
            format!("{:?} is not \"text\" or \"json\"", config.log.format),
        ));
    }
    validate_storage(config)?;
    validate_admin(config)?;
    validate_metrics(config)?;
    validate_jobs(config)?;
    validate_prefetch(config)?;
    super::auth::validate(config)?;
    validate_upstreams(&mut config.upstream)
}

fn validate_prefetch(config: &mut Config) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (i, p) in config.prefetch.iter_mut().enumerate() {
        let key = |field: &str| format!("prefetch[{i}].{field}");
        if p.name.is_empty() {
            p.name = format!("prefetch-{i}");
        }
        if !names.insert(p.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("{:?} is used by two prefetch lists", p.name),
            ));
        }
        if p.list.as_os_str().is_empty() {
            return Err(invalid(key("list"), "must name an image list file"));
        }
        if p.cadence.is_zero() {
            return Err(invalid(key("cadence"), "must be greater than 0"));
        }
    }
    Ok(())
}

fn validate_admin(config: &mut Config) -> Result<(), ConfigError> {
    let a = &mut config.admin;
    validate_listen("admin", a.listen.as_deref())?;
    validate_token("admin", &mut a.token, a.token_file.as_deref())
}

/// `<section>.listen`, when set, is host:port.
fn validate_listen(section: &str, listen: Option<&str>) -> Result<(), ConfigError> {
    if let Some(listen) = listen {
        listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                format!("{section}.listen"),
                format!("{listen:?} is not host:port ({e})"),
            )
        })?;
    }
    Ok(())
}

/// `<section>.token` or `<section>.token_file` (read into `token`), not both; at least
/// 16 characters, which no one guesses online.
fn validate_token(section: &str, token: &mut Option<Secret>, file: Option<&Path>) -> Result<(), ConfigError> {
    if token.is_some() && file.is_some() {
        return Err(invalid(
            format!("{section}.token_file"),
            "set either token or token_file, not both",
        ));
    }
    if let Some(path) = file {
        *token = Some(read_secret(&format!("{section}.token_file"), path)?);
    }
    if token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        return Err(invalid(
            format!("{section}.token"),
            "must be at least 16 characters",
        ));
    }
    Ok(())
}

fn validate_jobs(config: &mut Config) -> Result<(), ConfigError> {
    let j = &config.jobs;
    for (key, n) in [
        ("jobs.workers", j.workers),
        ("jobs.delete_workers", j.delete_workers),
    ] {
        if n == 0 || n > 64 {
            return Err(invalid(key, "must be between 1 and 64"));
        }
    }
    if j.max_attempts == 0 {
        return Err(invalid("jobs.max_attempts", "must be at least 1"));
    }
    if j.delete_batch == 0 || j.delete_batch > 100_000 {
        return Err(invalid("jobs.delete_batch", "must be between 1 and 100000"));
    }
    for (key, d) in [
        ("jobs.retry_initial", j.retry_initial),
        ("jobs.max_run_time", j.max_run_time),
        ("jobs.stale_after", j.stale_after),
        ("jobs.sweep_interval", j.sweep_interval),
    ] {
        if d.is_zero() {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    if j.retry_max < j.retry_initial {
        return Err(invalid(
            "jobs.retry_max",
            "must not be shorter than retry_initial",
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, p) in config.cleanup.policy.iter_mut().enumerate() {
        let key = |field: &str| format!("cleanup.policy[{i}].{field}");
        if p.name.is_empty() {
            p.name = format!("policy-{i}");
        }
        if !names.insert(p.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("{:?} is used by two policies", p.name),
            ));
        }
        crate::glob::Glob::new(&p.repositories).map_err(|e| invalid(key("repositories"), e))?;
        regex::Regex::new(&p.name_regex_delete)
            .map_err(|e| invalid(key("name_regex_delete"), e.to_string()))?;
        if let Some(keep) = &p.name_regex_keep {
            regex::Regex::new(keep).map_err(|e| invalid(key("name_regex_keep"), e.to_string()))?;
        }
        if p.cadence.is_zero() {
            return Err(invalid(key("cadence"), "must be greater than 0"));
        }
    }
    Ok(())
}

fn validate_storage(config: &mut Config) -> Result<(), ConfigError> {
    let d = &config.storage.delete;
    if d.workers == 0 || d.workers > 256 {
        return Err(invalid("storage.delete.workers", "must be between 1 and 256"));
    }
    if d.retry_initial.is_zero() {
        return Err(invalid("storage.delete.retry_initial", "must be greater than 0"));
    }
    if d.retry_max < d.retry_initial {
        return Err(invalid(
            "storage.delete.retry_max",
            "must not be shorter than retry_initial",
        ));
    }
    if !(1..=99).contains(&config.storage.low_watermark_percent) {
        return Err(invalid(
            "storage.low_watermark_percent",
            "must be between 1 and 99",
        ));
    }
    if config.storage.max_size.is_some_and(|m| m.as_u64() == 0) {
        return Err(invalid(
            "storage.max_size",
            "must be greater than 0 (leave it out for no bound)",
        ));
    }
    if config.storage.max_blob_size.as_u64() == 0 {
        return Err(invalid("storage.max_blob_size", "must be greater than 0"));
    }
    match config.storage.backend {
        Backend::S3 => {
            let s3 = config.storage.s3.as_mut().ok_or_else(|| {
                invalid(
                    "storage.s3",
                    "backend \"s3\" needs a [storage.s3] table with a bucket",
                )
            })?;
            if s3.bucket.is_empty() {
                return Err(invalid("storage.s3.bucket", "must not be empty"));
            }
            if let Some(endpoint) = &s3.endpoint {
                check_url("storage.s3.endpoint", endpoint)?;
            }
            if s3.secret_access_key.is_some() && s3.secret_access_key_file.is_some() {
                return Err(invalid(
                    "storage.s3.secret_access_key_file",
                    "set either secret_access_key or secret_access_key_file, not both",
                ));
            }
            if let Some(path) = &s3.secret_access_key_file {
                s3.secret_access_key = Some(read_secret("storage.s3.secret_access_key_file", path)?);
            }
            check_prefix("storage.s3.prefix", &s3.prefix)?;
        }
        Backend::Gcs => {
            let gcs = config.storage.gcs.as_ref().ok_or_else(|| {
                invalid(
                    "storage.gcs",
                    "backend \"gcs\" needs a [storage.gcs] table with a bucket",
                )
            })?;
            if gcs.bucket.is_empty() {
                return Err(invalid("storage.gcs.bucket", "must not be empty"));
            }
            if let Some(url) = &gcs.base_url {
                check_url("storage.gcs.base_url", url)?;
            }
            if gcs.service_account_path.is_some() && gcs.service_account_key.is_some() {
                return Err(invalid(
                    "storage.gcs.service_account_key",
                    "set either service_account_path or service_account_key, not both",
                ));
            }
            check_prefix("storage.gcs.prefix", &gcs.prefix)?;
        }
        Backend::Filesystem | Backend::Memory => {}
    }
    Ok(())
}

fn check_prefix(key: &str, prefix: &str) -> Result<(), ConfigError> {
    if prefix.starts_with('/') || prefix.contains("//") || prefix.split('/').any(|s| s == "." || s == "..") {
        return Err(invalid(
            key,
            format!("{prefix:?} must be a relative path without '.', '..' or empty segments"),
        ));
    }
    Ok(())
}

fn validate_upstreams(upstreams: &mut Vec<UpstreamConfig>) -> Result<(), ConfigError> {
    if upstreams.is_empty() {
        upstreams.push(UpstreamConfig {
            name: "docker.io".into(),
            url: DOCKER_HUB_URL.into(),
            default: true,
            username: None,
            password: None,
            password_file: None,
            ttl: None,
            ns: None,
        });
    }
    let mut names = std::collections::HashSet::new();
    for (i, u) in upstreams.iter_mut().enumerate() {
        let key = |field: &str| format!("upstream[{i}].{field}");
        if !crate::oci::RepoName::is_component(&u.name) {
            return Err(invalid(key("name"), format!("{:?} must be lowercase letters, digits and '.', '_' or '-' separators (it is used as a path prefix)", u.name)));
        }
        if !names.insert(u.name.clone()) {
            return Err(invalid(
                key("name"),
                format!("{:?} is used by two upstreams", u.name),
            ));
        }
        check_upstream_url(&key("url"), &u.url)?;
        u.url = u.url.trim_end_matches('/').to_owned();
        if u.password.is_some() && u.password_file.is_some() {
            return Err(invalid(
                key("password_file"),
                "set either password or password_file, not both",
            ));
        }
        if let Some(path) = &u.password_file {
            u.password = Some(read_secret(&key("password_file"), path)?);
        }
        if u.password.is_some() && u.username.is_none() {
            return Err(invalid(key("username"), "a password needs a username"));
        }
        if let Some(ns) = &mut u.ns {
            *ns = ns.to_ascii_lowercase();
            check_ns(&key("ns"), ns)?;
        }
    }
    match upstreams.iter().filter(|u| u.default).count() {
        0 if upstreams.len() == 1 => upstreams[0].default = true,
        0 | 1 => {}
        _ => {
            let i = upstreams.iter().rposition(|u| u.default).unwrap_or_default();
            return Err(invalid(
                format!("upstream[{i}].default"),
                "only one upstream may be the default",
            ));
        }
    }
    Ok(())
}

/// A registry host (`docker.io`, `ghcr.io`, `registry.local:5000`) or upstream name, as
/// containerd sends it in `ns`: nothing that would need escaping in a query.
fn check_ns(key: &str, ns: &str) -> Result<(), ConfigError> {
    let ok = !ns.is_empty()
        && ns.len() <= 255
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if !ok {
        return Err(invalid(
            key,
            format!("{ns:?} must be a registry host such as \"docker.io\" or \"registry.local:5000\""),
        ));
    }
    Ok(())
}

fn check_url(key: &str, raw: &str) -> Result<(), ConfigError> {
    let scheme_missing = || {
        let host = raw.split_once("://").map_or(raw, |(_, rest)| rest);
        invalid(
            key,
            format!(
                "{raw:?} needs http:// or https:// in front, e.g. \"https://{host}\" \
                 (\"http://{host}\" for a registry without TLS)"
            ),
        )
    };
    match url::Url::parse(raw) {
        // `registry.local` (no scheme) and `localhost:5000` (which parses with the scheme
        // `localhost`) both mean a host.
        Err(url::ParseError::RelativeUrlWithoutBase) => Err(scheme_missing()),
        Err(e) => Err(invalid(key, format!("{raw:?} is not a URL ({e})"))),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => Err(scheme_missing()),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => Err(invalid(
            key,
            format!("{raw:?} has no host; write it as \"https://host[:port]\""),
        )),
        Ok(_) => Ok(()),
    }
}

/// Whether `server.data_dir` can hold the cache: a directory this process can write, or a
/// path it can create (its nearest existing ancestor is a writable directory). Writing is
/// tried (a probe file, removed at once), since only that answers for ACLs, read-only
/// mounts and root squash alike. Creates nothing else.
pub fn check_data_dir(config: &Config) -> Result<(), ConfigError> {
    const KEY: &str = "server.data_dir";
    let dir = &config.server.data_dir;
    let choose = "or set server.data_dir to a directory this user can write";
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => probe_write(dir).map_err(|e| {
            invalid(
                KEY,
                format!("{} {}; {}", dir.display(), not_writable(&e), fix_dir(&e, choose)),
            )
        }),
        Ok(_) => Err(invalid(
            KEY,
            format!(
                "{} is a file, not a directory; move the file away {choose} (it is created if missing)",
                dir.display()
            ),
        )),
        Err(_) => {
            // Missing (or under a file, or unreadable): can the nearest existing ancestor
            // take the directory?
            let ancestor = dir
                .ancestors()
                .skip(1)
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| std::fs::symlink_metadata(a).is_ok())
                .unwrap_or(Path::new("/"));
            let why = match std::fs::metadata(ancestor) {
                Ok(m) if !m.is_dir() => format!("{} is a file, not a directory", ancestor.display()),
                Ok(_) => match probe_write(ancestor) {
                    Ok(()) => return Ok(()),
                    Err(e) => format!("{} {}", ancestor.display(), not_writable(&e)),
                },
                Err(e) => format!("{} cannot be read ({e})", ancestor.display()),
            };
            Err(invalid(
                KEY,
                format!(
                    "{} does not exist and cannot be created: {why}; create it with write \
                     permission for this user, {choose}",
                    dir.display()
                ),
            ))
        }
    }
}

fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".regcache-write-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Why a directory cannot be written, in words.
fn not_writable(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "is not writable by this user".to_owned(),
        std::io::ErrorKind::ReadOnlyFilesystem => "is on a read-only file system".to_owned(),
        std::io::ErrorKind::StorageFull => "is on a full file system".to_owned(),
        _ => format!("cannot be written ({e})"),
    }
}

fn fix_dir(e: &std::io::Error, choose: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            format!("give it to the user regcache runs as (chown), {choose}")
        }
        std::io::ErrorKind::ReadOnlyFilesystem => format!("mount it read-write, {choose}"),
        std::io::ErrorKind::StorageFull => format!("free some space, {choose}"),
        _ => choose.trim_start_matches("or ").to_owned(),
    }
}

/// An upstream URL: http(s) with a host, and a path only as the prefix requests go under
/// (`https://host/mirror` → `https://host/mirror/v2/…`); nothing that would be dropped
/// or printed unredacted.
fn check_upstream_url(key: &str, raw: &str) -> Result<(), ConfigError> {
    check_url(key, raw)?;
    let url = url::Url::parse(raw).map_err(|e| invalid(key, format!("{raw:?} is not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            key,
            "must not carry credentials (they would be printed); use username and password_file",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            key,
            format!("{raw:?} must not have a query or a fragment"),
        ));
    }
    let path = url.path().trim_end_matches('/');
    if path == "/v2" || path.ends_with("/v2") {
        return Err(invalid(
            key,
            format!("{raw:?} must not end in /v2: regcache adds /v2/ after the URL's path"),
        ));
    }
    Ok(())
}

fn validate_metrics(config: &mut Config) -> Result<(), ConfigError> {
    let m = &mut config.metrics;
    validate_listen("metrics", m.listen.as_deref())?;
    if let Some(listen) = &m.listen {
        if *listen == config.server.listen || Some(listen) == config.admin.listen.as_ref() {
            return Err(invalid(
                "metrics.listen",
                format!("{listen:?} is already the registry's or the admin API's address"),
            ));
        }
    }
    validate_token("metrics", &mut m.token, m.token_file.as_deref())
}

fn read_secret(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_at(dir: &Path) -> Config {
        let mut c = super::super::load(None, Vec::new()).unwrap();
        c.server.data_dir = dir.to_path_buf();
        c
    }

    fn message(e: ConfigError) -> String {
        match &e {
            ConfigError::Invalid { key, .. } => assert_eq!(key, "server.data_dir"),
            other => panic!("unexpected {other}"),
        }
        e.to_string()
    }

    #[test]
    fn a_usable_data_dir_passes_and_nothing_is_left_behind() {
        let tmp = tempfile::tempdir().unwrap();
        check_data_dir(&config_at(tmp.path())).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "probe removed");
        let missing = tmp.path().join("a/b/data");
        check_data_dir(&config_at(&missing)).unwrap();
        assert!(!tmp.path().join("a").exists(), "a check creates nothing");
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("data");
        std::fs::write(&file, "x").unwrap();
        let text = message(check_data_dir(&config_at(&file)).unwrap_err());
        assert!(
            text.contains(&format!("{} is a file, not a directory", file.display())),
            "{text}"
        );
        assert!(text.contains("set server.data_dir to a directory"), "{text}");
        let below = file.join("cache");
        let text = message(check_data_dir(&config_at(&below)).unwrap_err());
        for needle in [
            format!("{} does not exist and cannot be created", below.display()),
            format!("{} is a file, not a directory", file.display()),
        ] {
            assert!(text.contains(&needle), "{needle:?} in {text}");
        }
    }

    /// The words for what the kernel says (the binary tests meet the real errors).
    #[test]
    fn unwritable_and_read_only_are_said_with_their_fix() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let read_only = std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem);
        assert_eq!(not_writable(&denied), "is not writable by this user");
        assert!(fix_dir(&denied, "or x").starts_with("give it to the user regcache runs as"));
        assert_eq!(not_writable(&read_only), "is on a read-only file system");
        assert!(fix_dir(&read_only, "or x").starts_with("mount it read-write"));
    }

    fn upstream_url(url: &str) -> Result<String, ConfigError> {
        let env = vec![(
            "REGCACHE_UPSTREAM".to_owned(),
            format!("[{{name = \"m\", url = \"{url}\"}}]"),
        )];
        crate::config::load(None, env).map(|c| c.upstream[0].url.clone())
    }

    #[test]
    fn upstream_urls_keep_their_path_and_refuse_what_would_be_dropped() {
        assert_eq!(
            upstream_url("https://host/mirror/").unwrap(),
            "https://host/mirror"
        );
        assert_eq!(
            upstream_url("https://host/artifactory/api/docker/remote").unwrap(),
            "https://host/artifactory/api/docker/remote"
        );
        for bad in [
            "https://user:pw@host",
            "https://host/mirror?x=1",
            "https://host/mirror#top",
            "https://host/v2",
            "https://host/mirror/v2/",
        ] {
            let e = upstream_url(bad).unwrap_err();
            assert!(e.to_string().contains("upstream[0].url"), "{bad}: {e}");
        }
    }
}
