//! `--config FILE` for `skiff server` and `skiff agent`, in the format k3s users already write
//! (`/etc/rancher/k3s/config.yaml`): a YAML map whose keys are the long flag names without the
//! leading `--` and whose values are what the flag takes (`tls-san: [a, b]`, `disable-agent: true`,
//! `https-listen-port: 6444`). Without `--config`, `/etc/skiff/config.yaml` is read when it exists
//! (`SKIFF_CONFIG_FILE` names another default).
//!
//! The file's values become flags placed before the command line's, so the command line wins:
//! a flag given on the command line replaces the file's value, also for repeatable flags; a key
//! ending in `+` (`node-label+: [...]`) appends to the command line's values instead, as k3s does.
//! Unknown keys and values of the wrong shape are refused with the file and key named (exit 2).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Default config file when `--config` is not given.
const DEFAULT_PATH: &str = "/etc/skiff/config.yaml";

/// A config-file problem, reported with exit code 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What clap knows of the subcommand's flags: long names, and which take no value.
pub struct Flags {
    /// Every long flag name.
    pub names: BTreeSet<String>,
    /// Long names of boolean switches.
    pub switches: BTreeSet<String>,
    /// The subcommand (for messages).
    pub sub: String,
}

impl Flags {
    /// The flags of subcommand `sub` of `cmd`.
    pub fn of(cmd: &clap::Command, sub: &str) -> Flags {
        let mut names = BTreeSet::new();
        let mut switches = BTreeSet::new();
        if let Some(sc) = cmd.find_subcommand(sub) {
            for a in sc.get_arguments() {
                if let Some(l) = a.get_long() {
                    names.insert(l.to_string());
                    if !a.get_action().takes_values() {
                        switches.insert(l.to_string());
                    }
                }
            }
        }
        Flags {
            names,
            switches,
            sub: sub.to_string(),
        }
    }
}

/// The `--config` value on a command line (`--config F` or `--config=F`), if any.
fn config_arg(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.to_string());
        }
    }
    None
}

/// Long flag names given on the command line.
fn given(args: &[String]) -> BTreeSet<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

fn scalar(file: &Path, key: &str, v: &Value) -> Result<String, ConfigError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ConfigError(format!(
            "{}: `{key}` must be a string, number or boolean (or a list of them for a repeatable flag)",
            file.display()
        ))),
    }
}

/// Flags from config file `text` (read from `file`) for a command line whose own flags are
/// `cli` (everything after the subcommand).
pub fn flags_from(
    file: &Path,
    text: &str,
    flags: &Flags,
    cli: &[String],
) -> Result<Vec<String>, ConfigError> {
    let doc: Value = if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(text)
            .map_err(|e| ConfigError(format!("{}: not valid YAML: {e}", file.display())))?
    };
    let Value::Object(map) = doc else {
        return Err(ConfigError(format!(
            "{}: expected a map of flag names to values (e.g. `tls-san: [example.com]`)",
            file.display()
        )));
    };
    let on_cli = given(cli);
    let mut out = Vec::new();
    for (key, v) in &map {
        let (name, append) = match key.strip_suffix('+') {
            Some(k) => (k, true),
            None => (key.as_str(), false),
        };
        if name == "config" || !flags.names.contains(name) {
            return Err(ConfigError(format!(
                "{}: unknown key `{key}`: keys are `skiff {sub}` flag names without the leading `--` \
                 (see `skiff {sub} --help`)",
                file.display(),
                sub = flags.sub
            )));
        }
        if on_cli.contains(name) && !append {
            continue; // the command line replaces the file's value
        }
        if flags.switches.contains(name) {
            match v {
                Value::Bool(true) => out.push(format!("--{name}")),
                Value::Bool(false) => {}
                _ => {
                    return Err(ConfigError(format!(
                        "{}: `{key}` is a switch: write `{name}: true` or `{name}: false`",
                        file.display()
                    )));
                }
            }
            continue;
        }
        let values = match v {
            Value::Array(items) => items
                .iter()
                .map(|i| scalar(file, key, i))
                .collect::<Result<Vec<_>, _>>()?,
            Value::Null => Vec::new(),
            other => vec![scalar(file, key, other)?],
        };
        for val in values {
            out.push(format!("--{name}={val}"));
        }
    }
    Ok(out)
}

/// `argv` with the config file's flags inserted right after the subcommand `sub` (so that the
/// command line, coming later, wins). Returns `argv` unchanged for other subcommands.
pub fn expand(argv: Vec<String>, sub: &str, flags: &Flags) -> Result<Vec<String>, ConfigError> {
    let Some(pos) = argv.iter().position(|a| a == sub) else {
        return Ok(argv);
    };
    // Only the first positional is the subcommand; `skiff kubectl server` is not `server`.
    if argv[1..pos].iter().any(|a| !a.starts_with('-')) {
        return Ok(argv);
    }
    let cli = &argv[pos + 1..];
    let (path, explicit) = match config_arg(cli) {
        Some(p) => (PathBuf::from(p), true),
        None => (
            PathBuf::from(
                std::env::var("SKIFF_CONFIG_FILE").unwrap_or_else(|_| DEFAULT_PATH.to_string()),
            ),
            std::env::var_os("SKIFF_CONFIG_FILE").is_some(),
        ),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(argv),
        Err(e) => {
            return Err(ConfigError(format!(
                "cannot read config file {}: {e}",
                path.display()
            )));
        }
    };
    let extra = flags_from(&path, &text, flags, cli)?;
    let mut out = argv[..=pos].to_vec();
    out.extend(extra);
    out.extend_from_slice(cli);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Flags {
        Flags {
            names: [
                "tls-san",
                "node-label",
                "disable-agent",
                "https-listen-port",
                "data-dir",
                "config",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            switches: ["disable-agent"].iter().map(|s| s.to_string()).collect(),
            sub: "server".into(),
        }
    }

    fn run(text: &str, cli: &[&str]) -> Result<Vec<String>, ConfigError> {
        let cli: Vec<String> = cli.iter().map(|s| s.to_string()).collect();
        flags_from(Path::new("/c.yaml"), text, &flags(), &cli)
    }

    #[test]
    fn values_lists_and_switches_become_flags() {
        let out = run(
            "tls-san: [a.example, 10.0.0.1]\ndisable-agent: true\nhttps-listen-port: 6444\n",
            &[],
        )
        .unwrap_or_default();
        assert_eq!(
            out,
            [
                "--disable-agent",
                "--https-listen-port=6444",
                "--tls-san=a.example",
                "--tls-san=10.0.0.1"
            ]
        );
        assert!(
            run("disable-agent: false\n", &[])
                .unwrap_or_default()
                .is_empty()
        );
    }

    #[test]
    fn command_line_wins_unless_the_key_appends() {
        let out = run(
            "tls-san: [file]\nnode-label+: [a=1]\n",
            &["--tls-san", "cli", "--node-label=b=2"],
        )
        .unwrap_or_default();
        assert_eq!(out, ["--node-label=a=1"]);
    }

    #[test]
    fn unknown_keys_and_bad_shapes_name_the_file_and_key() {
        let e = run("tls-sans: [x]\n", &[])
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(
            e.contains("/c.yaml") && e.contains("unknown key `tls-sans`"),
            "{e}"
        );
        let e = run("disable-agent: yes please\n", &[])
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(e.contains("is a switch"), "{e}");
        let e = run("tls-san: {a: b}\n", &[])
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(e.contains("`tls-san` must be"), "{e}");
        let e = run("- a\n- b\n", &[])
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(e.contains("expected a map"), "{e}");
        assert!(run("", &[]).unwrap_or_default().is_empty());
    }

    #[test]
    fn expand_inserts_after_the_subcommand_and_reads_the_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("config.yaml");
        std::fs::write(&f, "https-listen-port: 7000\ntls-san: x\n").unwrap_or_default();
        let argv: Vec<String> = [
            "skiff",
            "server",
            "--config",
            &f.to_string_lossy(),
            "--tls-san=y",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand(argv, "server", &flags()).unwrap_or_default();
        assert_eq!(out[..3], ["skiff", "server", "--https-listen-port=7000"]);
        assert!(!out.contains(&"--tls-san=x".to_string()));
        let missing: Vec<String> = ["skiff", "server", "--config", "/nonexistent/skiff.yaml"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let e = expand(missing, "server", &flags())
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(
            e.contains("cannot read config file /nonexistent/skiff.yaml"),
            "{e}"
        );
    }
}
