//! The command line's help, as a newcomer reads it. The checks walk clap's command tree, so
//! they cover every subcommand, option and argument, including ones added later: each has a
//! help text, `--config` and `--json` read the same everywhere, and a repository is always
//! written `UPSTREAM/REPO`. The `--help` of every command is pinned by a snapshot in
//! `tests/snapshots/help/`; `REGCACHE_UPDATE_SNAPSHOTS=1` rewrites them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory;
use common::binary;

const UPDATE_VAR: &str = "REGCACHE_UPDATE_SNAPSHOTS";

/// Every command under the root (and the root), with the words that invoke it.
fn commands() -> Vec<(Vec<String>, clap::Command)> {
    let mut root = regcache::cli::Cli::command();
    root.build();
    let mut out = Vec::new();
    let mut stack = vec![(Vec::new(), root)];
    while let Some((path, cmd)) = stack.pop() {
        for sub in cmd.get_subcommands() {
            // clap's own `help` subcommand.
            if sub.get_name() == "help" {
                continue;
            }
            let mut p = path.clone();
            p.push(sub.get_name().to_owned());
            stack.push((p, sub.clone()));
        }
        out.push((path, cmd));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn own_args(cmd: &clap::Command) -> impl Iterator<Item = &clap::Arg> {
    cmd.get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
}

fn help_of(arg: &clap::Arg) -> String {
    arg.get_long_help()
        .or_else(|| arg.get_help())
        .map(ToString::to_string)
        .unwrap_or_default()
}

fn display(path: &[String]) -> String {
    std::iter::once("regcache".to_owned())
        .chain(path.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_command_tree_is_consistent() {
    regcache::cli::Cli::command().debug_assert();
}

#[test]
fn every_command_option_and_argument_has_a_help_text() {
    let mut missing = Vec::new();
    for (path, cmd) in commands() {
        if cmd.get_about().is_none_or(|a| a.to_string().trim().is_empty()) {
            missing.push(format!("{}: no description", display(&path)));
        }
        for arg in own_args(&cmd) {
            if help_of(arg).trim().is_empty() {
                missing.push(format!("{}: {} has no help", display(&path), arg.get_id()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "undocumented (add a /// comment):\n{}",
        missing.join("\n")
    );
}

/// The same option means the same thing everywhere, so it is described the same way:
/// flatten `cli::args::ConfigArg` / `JsonArg` rather than declaring your own.
#[test]
fn shared_options_read_the_same_everywhere() {
    for long in ["config", "json"] {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (path, cmd) in commands() {
            for arg in own_args(&cmd).filter(|a| a.get_long() == Some(long)) {
                let described = format!(
                    "help {:?}, short {:?}, env {:?}, value {:?}",
                    help_of(arg),
                    arg.get_short(),
                    arg.get_env(),
                    arg.get_value_names()
                );
                seen.entry(described).or_default().push(display(&path));
            }
        }
        assert!(!seen.is_empty(), "no command takes --{long}");
        assert_eq!(
            seen.len(),
            1,
            "--{long} is described in {} ways:\n{seen:#?}",
            seen.len()
        );
    }
}

#[test]
fn every_leaf_command_takes_config() {
    for (path, cmd) in commands() {
        if cmd.has_subcommands() || path.is_empty() {
            continue;
        }
        assert!(
            own_args(&cmd).any(|a| a.get_long() == Some("config")),
            "{} has no --config",
            display(&path)
        );
    }
}

/// One name for one thing: a positional that takes a repository is `UPSTREAM/REPO`.
#[test]
fn repositories_are_written_upstream_slash_repo() {
    let mut checked = 0;
    for (path, cmd) in commands() {
        for arg in own_args(&cmd).filter(|a| a.is_positional()) {
            let id = arg.get_id().as_str();
            let names: Vec<String> = arg
                .get_value_names()
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect();
            if id.contains("repo") || names.iter().any(|n| n.contains("REPO") || n == "NAME") {
                assert_eq!(
                    names,
                    ["UPSTREAM/REPO"],
                    "{}: argument {id} names a repository",
                    display(&path)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "purge, repos and delete-repo take a repository");
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/help")
}

fn snapshot_name(path: &[String]) -> String {
    if path.is_empty() {
        "regcache.txt".to_owned()
    } else {
        format!("{}.txt", path.join("-"))
    }
}

/// `regcache [SUBCOMMAND…] --help` as the binary prints it, for every command, against
/// `tests/snapshots/help/*.txt`. Runs the binary with an empty environment (so
/// `REGCACHE_CONFIG` shows no value) and not on a terminal (so the text wraps at 100
/// columns and has no colours).
#[test]
fn help_texts_match_their_snapshots() {
    let update = std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1");
    let dir = snapshot_dir();
    let cwd = tempfile::tempdir().expect("temp dir");
    let mut expected_files = Vec::new();
    let mut stale = Vec::new();
    for (path, _) in commands() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = binary::run(&args, &[], cwd.path(), Duration::from_secs(30)).ok();
        let name = snapshot_name(&path);
        let file = dir.join(&name);
        expected_files.push(name.clone());
        if update {
            std::fs::create_dir_all(&dir).expect("snapshot dir");
            std::fs::write(&file, &out.stdout).expect("writing a snapshot");
            continue;
        }
        match std::fs::read_to_string(&file) {
            Ok(pinned) if pinned == out.stdout => {}
            Ok(pinned) => {
                let line = pinned
                    .lines()
                    .zip(out.stdout.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| pinned.lines().count().min(out.stdout.lines().count()));
                stale.push(format!(
                    "{}: differs from {name} at line {}:\n  pinned: {:?}\n  now:    {:?}",
                    display(&path),
                    line + 1,
                    pinned.lines().nth(line).unwrap_or("<end>"),
                    out.stdout.lines().nth(line).unwrap_or("<end>")
                ));
            }
            Err(_) => stale.push(format!("{}: no snapshot {name}", display(&path))),
        }
    }
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !expected_files.contains(&name) {
            if update {
                std::fs::remove_file(entry.path()).expect("removing a stale snapshot");
            } else {
                stale.push(format!("{name}: no such command any more"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "help texts changed; review them, then regenerate the snapshots with\n  \
         {UPDATE_VAR}=1 cargo test --test cli_help\nand commit tests/snapshots/help/:\n{}",
        stale.join("\n")
    );
}
