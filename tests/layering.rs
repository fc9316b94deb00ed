//! The one-way layering ARCHITECTURE.md promises, checked on the source: each top-level
//! module may name only the modules below it (`crate::<module>` paths), so a type that
//! two layers share is placed in the lower one instead of pulling a layer upward.

use std::collections::BTreeSet;
use std::path::Path;

/// Each module and the modules it may use besides itself. Top to bottom:
/// server/cli → registry/admin → scheduler → (cache, bundle) → (metadata, storage, upstream) →
/// config → (oci, glob); `auth` (who may pull what) sits beside the cache, on config,
/// glob and identity (a client certificate's names, pure), for the HTTP layers. `fault`
/// (test-only panic points), `counters` (lock-free counters) and `civil` (calendar dates)
/// depend on nothing and may be used anywhere; `metrics` and `status_page` sit beside
/// `registry`, read the layers below and name each other; `metrics` writes access-log lines
/// straight to `log_writer`.
const ALLOWED: &[(&str, &[&str])] = &[
    ("civil", &[]),
    ("oci", &["civil"]),
    ("glob", &[]),
    ("fault", &[]),
    ("counters", &[]),
    ("log_writer", &[]),
    ("imagelist", &["oci"]),
    ("config", &["oci", "glob"]),
    ("metadata", &["oci", "config", "counters"]),
    ("storage", &["oci", "config"]),
    ("upstream", &["oci", "config", "counters"]),
    (
        "cache",
        &[
            "metadata", "storage", "upstream", "oci", "config", "fault", "counters",
        ],
    ),
    (
        "bundle",
        &["metadata", "storage", "upstream", "imagelist", "oci", "config"],
    ),
    (
        "scheduler",
        &[
            "cache", "bundle", "metadata", "storage", "oci", "config", "glob", "fault",
        ],
    ),
    (
        "prefetch",
        &["scheduler", "cache", "metadata", "imagelist", "oci", "config"],
    ),
    ("identity", &[]),
    ("auth", &["config", "glob", "identity"]),
    (
        "registry",
        &["auth", "cache", "upstream", "oci", "config", "fault"],
    ),
    ("admin", &["auth", "metadata", "upstream", "oci", "config"]),
    (
        "metrics",
        &[
            "status_page",
            "admin",
            "auth",
            "cache",
            "metadata",
            "upstream",
            "oci",
            "config",
            "counters",
            "civil",
            "log_writer",
        ],
    ),
    (
        "status_page",
        &["metrics", "admin", "auth", "metadata", "upstream", "config"],
    ),
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules `text` names as `crate::<module>`.
fn named_modules(text: &str) -> BTreeSet<String> {
    text.match_indices("crate::")
        .map(|(i, _)| {
            text[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn every_module_depends_only_on_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (module, allowed) in ALLOWED {
        let mut files = vec![src.join(format!("{module}.rs"))];
        if src.join(module).is_dir() {
            sources(&src.join(module), &mut files);
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for used in named_modules(&text) {
                if used != *module && !allowed.contains(&used.as_str()) {
                    violations.push(format!("{} uses crate::{used}", file.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "dependencies must point one way (see ARCHITECTURE.md):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_check_sees_a_path_that_points_upward() {
    assert_eq!(
        named_modules("use crate::scheduler::ActiveBlobs; crate::oci::Digest"),
        BTreeSet::from(["oci".to_owned(), "scheduler".to_owned()])
    );
}
