//! Generates `crates/apiserver/src/proto_schema.rs`, the field table the protobuf request decoder
//! (`src/proto.rs`) walks.
//!
//! Run `cargo run -p skiff-apiserver --example gen_proto_schema && cargo fmt --all`: it rewrites
//! the file in place (only after a successful generation: the library it links includes the old
//! table, so the output must not be a shell redirection onto it). An optional argument names
//! k8s-pb's `src` directory; by default it is found with `cargo metadata` (k8s-pb is a
//! dev-dependency of this crate).
//!
//! Inputs: the prost-generated Rust of the `k8s-pb` crate (field numbers, wire types, message
//! types, repeated/map) and the k8s-openapi JSON schemas the apiserver already serves as OpenAPI
//! v3 (the JSON field names: k8s-pb snake-cases the proto names, `pod_ip` ← `podIP`, so names
//! are matched by their lowercase alphanumerics). Starting from every kind of the resource table
//! (and the kinds its subresources accept), it follows message fields through the schemas. A
//! message field with no JSON property of its own is a Go embedded struct (`Probe.handler`,
//! `Volume.volumeSource`, `SecretEnvSource.localObjectReference`): its fields are inlined into
//! the parent. Any field it cannot name stops it with an error listing all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq)]
enum Ty {
    Str,
    Bytes,
    I32,
    I64,
    Bool,
    F64,
    /// A message, by full name (`io.k8s.api.core.v1.PodSpec`, prost casing).
    Msg(String),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Card {
    One,
    Rep,
    Map,
}

#[derive(Clone, Debug)]
struct PField {
    tag: u32,
    name: String,
    ty: Ty,
    card: Card,
}

/// Messages with a JSON form of their own (apimachinery special types).
fn special(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "io.k8s.apimachinery.pkg.apis.meta.v1.time" => "Time",
        "io.k8s.apimachinery.pkg.apis.meta.v1.microtime" => "MicroTime",
        "io.k8s.apimachinery.pkg.apis.meta.v1.duration" => "Duration",
        "io.k8s.apimachinery.pkg.api.resource.quantity" => "Quantity",
        "io.k8s.apimachinery.pkg.util.intstr.intorstring" => "IntOrString",
        "io.k8s.apimachinery.pkg.runtime.rawextension"
        | "io.k8s.apimachinery.pkg.apis.meta.v1.fieldsv1"
        | "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.json" => "Json",
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.jsonschemapropsorbool" => {
            "OrBool"
        }
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.jsonschemapropsorarray" => {
            "OrArray"
        }
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.jsonschemapropsorstringarray" => {
            "OrStringArray"
        }
        n if n.ends_with(".extravalue") => "StrList",
        _ => return None,
    })
}

const SCHEMA_PROPS: &str =
    "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JsonSchemaProps";

fn norm(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn k8s_pb_src() -> Result<PathBuf, String> {
    if let Some(a) = std::env::args().nth(1) {
        return Ok(PathBuf::from(a));
    }
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1"])
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))?;
    let pkgs = v["packages"].as_array().cloned().unwrap_or_default();
    let manifest = pkgs
        .iter()
        .find(|p| p["name"] == "k8s-pb")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("k8s-pb is not in the dependency graph")?;
    Ok(Path::new(manifest)
        .parent()
        .ok_or("bad manifest path")?
        .join("src"))
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.is_dir() {
            rs_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Module path segments of a file (`api/apps/v1/mod.rs` → `[api, apps, v1]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut segs: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = segs.pop()
        && last != "mod.rs"
        && last != "lib.rs"
    {
        segs.push(last.trim_end_matches(".rs").to_string());
    }
    segs
}

fn full_name(module: &[String], ty: &str) -> String {
    let pkg: Vec<String> = module.iter().map(|s| s.replace('_', "-")).collect();
    format!("io.k8s.{}.{ty}", pkg.join("."))
}

/// Resolves a Rust type path of a message field to the message's full name.
fn resolve(module: &[String], ty: &str) -> String {
    let mut t = ty.replace(' ', "");
    for w in [
        "::core::option::Option<",
        "::prost::alloc::vec::Vec<",
        "::prost::alloc::boxed::Box<",
    ] {
        t = t.replace(w, "");
    }
    let t = t.trim_end_matches(['>', ',']).to_string();
    let mut m: Vec<String> = module.to_vec();
    let segs: Vec<&str> = t.split("::").filter(|s| !s.is_empty()).collect();
    let (last, path) = segs.split_last().unwrap_or((&"", &[]));
    for s in path {
        if *s == "super" {
            m.pop();
        } else {
            m.push((*s).to_string());
        }
    }
    full_name(&m, last)
}

fn parse(src: &Path) -> Result<HashMap<String, Vec<PField>>, String> {
    let mut files = Vec::new();
    rs_files(src, &mut files)?;
    let mut msgs: HashMap<String, Vec<PField>> = HashMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let module = module_of(src, &f);
        let mut cur: Option<String> = None;
        let mut attr: Option<String> = None;
        let mut decl = String::new();
        for line in text.lines() {
            let l = line.trim();
            if let Some(rest) = l.strip_prefix("pub struct ") {
                let name = rest.split([' ', '{']).next().unwrap_or_default();
                let n = full_name(&module, name);
                msgs.insert(n.clone(), Vec::new());
                cur = Some(n);
                continue;
            }
            if l == "}" {
                cur = None;
                continue;
            }
            if let Some(a) = l.strip_prefix("#[prost(") {
                attr = Some(a.trim_end_matches(")]").to_string());
                decl.clear();
                continue;
            }
            let (Some(c), Some(a)) = (&cur, &attr) else {
                continue;
            };
            if l.starts_with("///") {
                continue;
            }
            decl.push_str(l);
            if !decl.ends_with(',') || decl.matches('<').count() != decl.matches('>').count() {
                continue;
            }
            let (name, ty) = decl
                .strip_prefix("pub ")
                .and_then(|d| d.split_once(':'))
                .ok_or_else(|| format!("{}: cannot parse field {decl:?}", f.display()))?;
            let name = name.trim().trim_start_matches("r#").to_string();
            let tag: u32 = a
                .split("tag = \"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("{c}.{name}: no tag in {a:?}"))?;
            let kind = a.split(',').next().unwrap_or_default().trim();
            let card = if a.contains("repeated") {
                Card::Rep
            } else if kind.starts_with("btree_map") {
                Card::Map
            } else {
                Card::One
            };
            let scalar = |k: &str| -> Result<Ty, String> {
                Ok(match k {
                    "string" => Ty::Str,
                    "bytes" => Ty::Bytes,
                    "int32" => Ty::I32,
                    "int64" => Ty::I64,
                    "bool" => Ty::Bool,
                    "double" => Ty::F64,
                    "message" => {
                        let t = ty.trim().trim_end_matches([',', '>']);
                        let t = if card == Card::Map {
                            t.rsplit_once(',').map_or(t, |(_, b)| b)
                        } else {
                            t
                        };
                        Ty::Msg(resolve(&module, t))
                    }
                    other => return Err(format!("{c}.{name}: unsupported prost type {other:?}")),
                })
            };
            let ty = if card == Card::Map {
                let v = a
                    .split('"')
                    .nth(1)
                    .and_then(|s| s.split(',').nth(1))
                    .map(str::trim)
                    .ok_or_else(|| format!("{c}.{name}: bad map {kind:?}"))?;
                scalar(v)?
            } else {
                scalar(kind.split(' ').next().unwrap_or(kind))?
            };
            msgs.entry(c.clone()).or_default().push(PField {
                tag,
                name,
                ty,
                card,
            });
            attr = None;
            decl.clear();
        }
    }
    Ok(msgs)
}

/// The definition a property schema refers to (directly, in allOf, items or map values).
fn ref_of(s: &Value) -> Option<String> {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return r.strip_prefix("#/components/schemas/").map(str::to_string);
    }
    if let Some(Value::Array(a)) = s.get("allOf")
        && let Some(x) = a.first()
    {
        return ref_of(x);
    }
    if let Some(i) = s.get("items") {
        return ref_of(i);
    }
    if let Some(i) = s.get("additionalProperties") {
        return ref_of(i);
    }
    None
}

#[derive(Clone, Debug, PartialEq)]
struct Named {
    tag: u32,
    json: Option<String>,
    ty: Ty,
    card: Card,
}

fn main() -> ExitCode {
    match run() {
        Ok(s) => {
            let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proto_schema.rs");
            match std::fs::write(&out, s) {
                Ok(()) => {
                    eprintln!(
                        "gen_proto_schema: wrote {} (now run cargo fmt --all)",
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gen_proto_schema: writing {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("gen_proto_schema: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, String> {
    let src = k8s_pb_src()?;
    let msgs = parse(&src)?;
    let by_lower: HashMap<String, String> = msgs
        .keys()
        .map(|k| (k.to_ascii_lowercase(), k.clone()))
        .collect();
    let (defs, roots) = skiff_apiserver::openapi_components();
    let def_lower: HashMap<String, String> = defs
        .keys()
        .map(|k| (k.to_ascii_lowercase(), k.clone()))
        .collect();

    // Roots: every kind of the resource table and of its subresources.
    let mut kinds: BTreeSet<(String, String, String)> = BTreeSet::new();
    for r in skiff_api::RESOURCES {
        kinds.insert((r.group.into(), r.version.into(), r.kind.into()));
        for s in r.subresources {
            if s.kind.is_empty() {
                continue;
            }
            let g = if s.group.is_empty() && s.version.is_empty() {
                r.group
            } else {
                s.group
            };
            let v = if s.version.is_empty() {
                r.version
            } else {
                s.version
            };
            kinds.insert((g.into(), v.into(), s.kind.into()));
        }
    }
    let mut errors = Vec::new();
    let mut root_msgs: Vec<(String, String, String)> = Vec::new(); // apiVersion, kind, message
    let mut queue: VecDeque<(String, String)> = VecDeque::new(); // message, definition
    for (g, v, k) in &kinds {
        if k.ends_with("Options") {
            continue; // query parameters of connect subresources, never a body
        }
        // A version without a schema of its own (authentication/v1beta1 SelfSubjectReview) is
        // named from another version of the same kind: JSON names do not change across versions.
        let Some((_, _, _, def)) = roots
            .iter()
            .find(|(rg, rv, rk, _)| rg == g && rv == v && rk == k)
            .or_else(|| roots.iter().find(|(rg, _, rk, _)| rg == g && rk == k))
        else {
            errors.push(format!("no OpenAPI schema for {g}/{v} {k}"));
            continue;
        };
        let pkg = if g.is_empty() {
            "core".to_string()
        } else {
            g.trim_end_matches(".k8s.io").replace(".authorization", "")
        };
        let want = if g == "apiextensions.k8s.io" {
            format!("io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.{v}.{k}")
        } else {
            format!("io.k8s.api.{pkg}.{v}.{k}")
        };
        let Some(m) = by_lower.get(&want.to_ascii_lowercase()) else {
            errors.push(format!("no k8s-pb message {want} for {def}"));
            continue;
        };
        let av = if g.is_empty() {
            v.clone()
        } else {
            format!("{g}/{v}")
        };
        root_msgs.push((av, k.clone(), m.clone()));
        queue.push_back((m.clone(), def.clone()));
    }

    let mut named: BTreeMap<String, Vec<Named>> = BTreeMap::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    while let Some((m, def)) = queue.pop_front() {
        if !seen.insert((m.clone(), def.clone())) {
            continue;
        }
        let fields = msgs.get(&m).ok_or_else(|| format!("unknown message {m}"))?;
        let props: Map<String, Value> = defs
            .get(&def)
            .and_then(|d| d.get("properties"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::new();
        for f in fields {
            let key = props.keys().find(|k| norm(k) == norm(&f.name)).cloned();
            let mut n = Named {
                tag: f.tag,
                json: key.clone(),
                ty: f.ty.clone(),
                card: f.card,
            };
            match (&key, &f.ty) {
                (Some(k), Ty::Msg(t)) => match special(t) {
                    Some("OrBool" | "OrArray" | "OrStringArray") => {
                        let d = def_lower
                            .get(&SCHEMA_PROPS.to_ascii_lowercase())
                            .cloned()
                            .ok_or("no JSONSchemaProps schema")?;
                        queue.push_back((SCHEMA_PROPS.to_string(), d));
                    }
                    Some(_) => {}
                    None => match props.get(k).and_then(ref_of) {
                        Some(d) => queue.push_back((t.clone(), d)),
                        None => errors.push(format!("{m}.{k}: property has no schema ref")),
                    },
                },
                (Some(_), _) => {}
                (None, Ty::Msg(t)) if f.card == Card::One && special(t).is_none() => {
                    // A Go embedded struct: named against the same definition.
                    queue.push_back((t.clone(), def.clone()));
                    n.json = None;
                }
                (None, _) => errors.push(format!(
                    "{m}.{} (tag {}): no JSON name in {def}",
                    f.name, f.tag
                )),
            }
            out.push(n);
        }
        out.sort_by_key(|n| n.tag);
        if let Some(prev) = named.get(&m) {
            if *prev != out {
                errors.push(format!("{m}: named differently under {def}"));
            }
        } else {
            named.insert(m, out);
        }
    }
    if !errors.is_empty() {
        return Err(format!(
            "{} field(s) could not be named:\n  {}",
            errors.len(),
            errors.join("\n  ")
        ));
    }

    // Emit.
    let index: HashMap<&String, usize> = named.keys().enumerate().map(|(i, k)| (k, i)).collect();
    let props_ix = named
        .keys()
        .position(|k| k == SCHEMA_PROPS)
        .unwrap_or(usize::MAX);
    let ty_of = |t: &Ty| -> String {
        match t {
            Ty::Str => "T::Str".into(),
            Ty::Bytes => "T::Bytes".into(),
            Ty::I32 => "T::I32".into(),
            Ty::I64 => "T::I64".into(),
            Ty::Bool => "T::Bool".into(),
            Ty::F64 => "T::F64".into(),
            Ty::Msg(m) => match special(m) {
                Some(s @ ("OrBool" | "OrArray" | "OrStringArray")) => format!("T::{s}({props_ix})"),
                Some(s) => format!("T::{s}"),
                None => format!("T::Msg({})", index.get(m).copied().unwrap_or(usize::MAX)),
            },
        }
    };
    let mut o = String::new();
    o.push_str(
        "//! Protobuf field table of every built-in kind skiff serves, for `proto.rs`.\n\
         //! GENERATED by `cargo run -p skiff-apiserver --example gen_proto_schema` from k8s-pb's\n\
         //! prost code (field numbers, types) and k8s-openapi's schemas (JSON names). Do not edit.\n\n\
         use crate::proto::{C, F, M, T};\n\n",
    );
    o.push_str(
        "/// (apiVersion, kind, index into `MESSAGES`) of every kind that can be a request body.\n",
    );
    let _ = writeln!(o, "pub(crate) static ROOTS: &[(&str, &str, u16)] = &[");
    root_msgs.sort();
    for (av, k, m) in &root_msgs {
        let _ = writeln!(o, "    ({av:?}, {k:?}, {}),", index[m]);
    }
    o.push_str(
        "];\n\n/// Every message reachable from `ROOTS`, by full name; fields sorted by tag.\n",
    );
    let _ = writeln!(o, "pub(crate) static MESSAGES: &[M] = &[");
    for (m, fields) in &named {
        let _ = writeln!(o, "    M {{\n        name: {m:?},\n        fields: &[");
        for f in fields {
            let card = match (f.card, &f.json) {
                (_, None) => "C::Inline",
                (Card::One, _) => "C::One",
                (Card::Rep, _) => "C::Rep",
                (Card::Map, _) => "C::Map",
            };
            let _ = writeln!(
                o,
                "            F {{ tag: {}, json: {:?}, ty: {}, card: {card} }},",
                f.tag,
                f.json.clone().unwrap_or_default(),
                ty_of(&f.ty)
            );
        }
        o.push_str("        ],\n    },\n");
    }
    o.push_str("];\n");
    if o.contains("usize::MAX") || o.contains(&usize::MAX.to_string()) {
        return Err("a message index is missing".into());
    }
    Ok(o)
}
