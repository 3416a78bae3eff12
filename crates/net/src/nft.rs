//! nftables primitives: a small typed model of one table (base and regular chains, verdict maps,
//! rules with DNAT, numgen spread, REJECT and masquerade), rendered to `nft -f` text and applied
//! as ONE batch that replaces the whole table's content atomically (`add table; delete table;
//! add table; ...`), so applying the same model twice yields exactly the same ruleset and a
//! restart never duplicates rules. Only the named table is ever touched.
//!
//! Why `nft -f` text rather than the `nftables` crate's JSON: both drive the same `nft` binary
//! (the crate runs `nft -j -f -`); the text form is nft's primary, documented input, its parse
//! errors point at the offending line, and the model here renders to it in a few lines without
//! mirroring nft's JSON schema. Listing (`nft -j list table`) returns JSON for tests and checks.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{Ipv4Cidr, NetError};

/// The table skiff owns in production.
pub const SKIFF_TABLE: &str = "skiff";

/// Address family of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 and IPv6 (`inet`).
    Inet,
    /// IPv4 only (`ip`).
    Ip,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
        })
    }
}

/// One nftables table, with everything in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Family.
    pub family: Family,
    /// Name (letters, digits, `_`, `-`, `.`; starting with a letter or `_`).
    pub name: String,
    /// Chains, in creation order.
    pub chains: Vec<Chain>,
    /// Verdict maps.
    pub maps: Vec<Map>,
    /// Address sets (static, or dynamic with a timeout for session affinity).
    pub sets: Vec<Set>,
}

/// A named set of IPv4 addresses or address pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// Name.
    pub name: String,
    /// What the elements are.
    pub kind: SetKind,
    /// Some(seconds): a dynamic set whose elements expire (filled by [`Stmt::UpdateSrcSet`]).
    pub timeout_secs: Option<u32>,
    /// Static elements (must match `kind`).
    pub elements: Vec<SetElement>,
}

/// Element types of a [`Set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// `ipv4_addr`
    Addr,
    /// `ipv4_addr . ipv4_addr` (matched as `ip saddr . ip daddr`)
    AddrPair,
}

/// One element of a [`Set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetElement {
    /// An address.
    Addr(Ipv4Addr),
    /// A pair of addresses.
    AddrPair(Ipv4Addr, Ipv4Addr),
}

/// A chain; a base chain has a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Name.
    pub name: String,
    /// Hook, type, priority and policy for a base chain; None for a regular chain.
    pub base: Option<BaseChain>,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

/// What makes a chain a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    /// Chain type.
    pub kind: ChainKind,
    /// Netfilter hook.
    pub hook: Hook,
    /// Priority (dstnat = -100, filter = 0, srcnat = 100).
    pub priority: i32,
    /// Default verdict.
    pub policy: Policy,
}

/// Chain types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// `nat`
    Nat,
    /// `filter`
    Filter,
}

/// Netfilter hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `prerouting`
    Prerouting,
    /// `input`
    Input,
    /// `forward`
    Forward,
    /// `output`
    Output,
    /// `postrouting`
    Postrouting,
}

/// Base chain policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `accept`
    Accept,
    /// `drop`
    Drop,
}

/// A verdict map keyed by `IPv4 address . protocol . port` (how services are dispatched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    /// Name.
    pub name: String,
    /// Elements; order does not matter (nft lists them its own way).
    pub elements: Vec<(ServiceKey, Verdict)>,
}

/// `address . protocol . port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Destination address.
    pub addr: Ipv4Addr,
    /// Transport protocol.
    pub proto: Proto,
    /// Destination port.
    pub port: u16,
}

/// Transport protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// SCTP
    Sctp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        })
    }
}

/// Verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `accept`
    Accept,
    /// `drop`
    Drop,
    /// `return`
    Return,
    /// `jump CHAIN`
    Jump(String),
    /// `goto CHAIN`
    Goto(String),
}

/// One rule: all matches must hold, then the statements run in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Conditions.
    pub matches: Vec<Match>,
    /// Statements.
    pub stmts: Vec<Stmt>,
    /// Optional comment (quotes and backslashes are dropped).
    pub comment: Option<String>,
}

/// Conditions a rule can test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ip saddr CIDR`
    SrcIn(Ipv4Cidr),
    /// `ip saddr != CIDR`
    SrcNotIn(Ipv4Cidr),
    /// `ip daddr CIDR`
    DstIn(Ipv4Cidr),
    /// `ip daddr != CIDR`
    DstNotIn(Ipv4Cidr),
    /// `meta l4proto P`
    Proto(Proto),
    /// `th dport N` (needs a protocol match before it)
    DstPort(u16),
    /// `meta mark & M == M`
    MarkSet(u32),
    /// `fib daddr type local`
    DstLocal,
    /// `ct state new`
    CtNew,
    /// `ip saddr @SET` (an [`SetKind::Addr`] set)
    SrcInSet(String),
    /// `ip saddr . ip daddr @SET` (an [`SetKind::AddrPair`] set)
    SrcDstInSet(String),
    /// `ct status dnat` (the connection's destination was rewritten)
    CtDnat,
}

/// How a REJECT answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// ICMP(v6) port unreachable (`reject`).
    PortUnreachable,
    /// TCP reset (`reject with tcp reset`; needs a TCP match).
    TcpReset,
}

/// Statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `counter`
    Counter,
    /// `meta mark set meta mark | M`
    OrMark(u32),
    /// `dnat ip to ADDR[:PORT]`
    Dnat {
        /// New destination address.
        addr: Ipv4Addr,
        /// New destination port (None: keep).
        port: Option<u16>,
    },
    /// `masquerade`
    Masquerade,
    /// `reject ...`
    Reject(RejectKind),
    /// `ip daddr . meta l4proto . th dport vmap @MAP`
    DispatchMap(String),
    /// Even spread: `numgen random mod N vmap { 0 : goto T0, ... }` (a single target: `goto T0`).
    Spread(Vec<String>),
    /// A final verdict.
    Verdict(Verdict),
    /// `update @SET { ip saddr }`: remember the source in a dynamic set (session affinity).
    UpdateSrcSet(String),
    /// DNAT spread evenly over backends in one rule: `dnat ip to numgen random mod N map { 0 :
    /// ADDR . PORT, ... }` (one backend: `dnat ip to ADDR:PORT`). Needs at least one backend.
    DnatSpread(Vec<(Ipv4Addr, u16)>),
}

impl Table {
    /// An empty table.
    pub fn new(family: Family, name: impl Into<String>) -> Table {
        Table {
            family,
            name: name.into(),
            chains: Vec::new(),
            maps: Vec::new(),
            sets: Vec::new(),
        }
    }

    /// Checks names and references, so nft never sees a malformed batch.
    pub fn validate(&self) -> Result<(), NetError> {
        check_name(&self.name)?;
        let mut chains = std::collections::HashSet::new();
        for c in &self.chains {
            check_name(&c.name)?;
            if !chains.insert(c.name.as_str()) {
                return Err(NetError::invalid(&c.name, "duplicate chain name"));
            }
        }
        let mut maps = std::collections::HashSet::new();
        for m in &self.maps {
            check_name(&m.name)?;
            if !maps.insert(m.name.as_str()) {
                return Err(NetError::invalid(&m.name, "duplicate map name"));
            }
        }
        let mut sets = std::collections::HashMap::new();
        for set in &self.sets {
            check_name(&set.name)?;
            if maps.contains(set.name.as_str())
                || sets.insert(set.name.as_str(), set.kind).is_some()
            {
                return Err(NetError::invalid(&set.name, "duplicate set name"));
            }
            for e in &set.elements {
                let ok = matches!(
                    (set.kind, e),
                    (SetKind::Addr, SetElement::Addr(_))
                        | (SetKind::AddrPair, SetElement::AddrPair(..))
                );
                if !ok {
                    return Err(NetError::invalid(
                        &set.name,
                        "set element does not match the set's type",
                    ));
                }
            }
        }
        let set_ref = |name: &str, kind: SetKind| -> Result<(), NetError> {
            match sets.get(name) {
                Some(k) if *k == kind => Ok(()),
                Some(_) => Err(NetError::invalid(
                    name,
                    "set used with the wrong element type",
                )),
                None => Err(NetError::invalid(
                    name,
                    "rule names a set that is not in the table",
                )),
            }
        };
        let chain_ref = |v: &Verdict| -> Result<(), NetError> {
            match v {
                Verdict::Jump(c) | Verdict::Goto(c) if !chains.contains(c.as_str()) => Err(
                    NetError::invalid(c, "verdict names a chain that is not in the table"),
                ),
                _ => Ok(()),
            }
        };
        for m in &self.maps {
            for (_, v) in &m.elements {
                chain_ref(v)?;
            }
        }
        for c in &self.chains {
            for r in &c.rules {
                for m in &r.matches {
                    match m {
                        Match::SrcInSet(name) => set_ref(name, SetKind::Addr)?,
                        Match::SrcDstInSet(name) => set_ref(name, SetKind::AddrPair)?,
                        _ => {}
                    }
                }
                for s in &r.stmts {
                    match s {
                        Stmt::UpdateSrcSet(name) => {
                            set_ref(name, SetKind::Addr)?;
                            if !self
                                .sets
                                .iter()
                                .any(|x| x.name == *name && x.timeout_secs.is_some())
                            {
                                return Err(NetError::invalid(
                                    name,
                                    "update needs a set with a timeout",
                                ));
                            }
                        }
                        Stmt::DnatSpread(b) if b.is_empty() => {
                            return Err(NetError::invalid(
                                &c.name,
                                "a dnat spread needs at least one backend (use a reject for none)",
                            ));
                        }
                        Stmt::Verdict(v) => chain_ref(v)?,
                        Stmt::Spread(targets) => {
                            if targets.is_empty() {
                                return Err(NetError::invalid(
                                    &c.name,
                                    "a spread needs at least one target (use a reject for none)",
                                ));
                            }
                            for t in targets {
                                chain_ref(&Verdict::Goto(t.clone()))?;
                            }
                        }
                        Stmt::DispatchMap(m) if !maps.contains(m.as_str()) => {
                            return Err(NetError::invalid(
                                m,
                                "rule names a map that is not in the table",
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The `nft -f` batch that replaces this table's whole content atomically.
    pub fn render(&self) -> Result<String, NetError> {
        self.validate()?;
        let (fam, t) = (self.family, self.name.as_str());
        let mut out = String::with_capacity(128 + 96 * self.chains.len());
        // add+delete in one transaction: works whether the table exists or not.
        let _ = writeln!(
            out,
            "add table {fam} {t}\ndelete table {fam} {t}\nadd table {fam} {t}"
        );
        for c in &self.chains {
            match &c.base {
                Some(b) => {
                    let _ = writeln!(
                        out,
                        "add chain {fam} {t} {} {{ type {} hook {} priority {}; policy {}; }}",
                        c.name,
                        match b.kind {
                            ChainKind::Nat => "nat",
                            ChainKind::Filter => "filter",
                        },
                        match b.hook {
                            Hook::Prerouting => "prerouting",
                            Hook::Input => "input",
                            Hook::Forward => "forward",
                            Hook::Output => "output",
                            Hook::Postrouting => "postrouting",
                        },
                        b.priority,
                        match b.policy {
                            Policy::Accept => "accept",
                            Policy::Drop => "drop",
                        }
                    );
                }
                None => {
                    let _ = writeln!(out, "add chain {fam} {t} {}", c.name);
                }
            }
        }
        for set in &self.sets {
            let _ = write!(
                out,
                "add set {fam} {t} {} {{ type {};",
                set.name,
                match set.kind {
                    SetKind::Addr => "ipv4_addr",
                    SetKind::AddrPair => "ipv4_addr . ipv4_addr",
                }
            );
            if let Some(secs) = set.timeout_secs {
                let _ = write!(out, " flags dynamic,timeout; timeout {secs}s;");
            }
            if !set.elements.is_empty() {
                out.push_str(" elements = { ");
                for (i, e) in set.elements.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    let _ = match e {
                        SetElement::Addr(a) => write!(out, "{a}"),
                        SetElement::AddrPair(a, b) => write!(out, "{a} . {b}"),
                    };
                }
                out.push_str(" }");
            }
            out.push_str(" }\n");
        }
        for m in &self.maps {
            let _ = write!(
                out,
                "add map {fam} {t} {} {{ type ipv4_addr . inet_proto . inet_service : verdict;",
                m.name
            );
            if !m.elements.is_empty() {
                out.push_str(" elements = { ");
                for (i, (k, v)) in m.elements.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    let _ = write!(
                        out,
                        "{} . {} . {} : {}",
                        k.addr,
                        k.proto,
                        k.port,
                        verdict(v)
                    );
                }
                out.push_str(" }");
            }
            out.push_str(" }\n");
        }
        for c in &self.chains {
            for r in &c.rules {
                let _ = write!(out, "add rule {fam} {t} {}", c.name);
                for m in &r.matches {
                    out.push(' ');
                    out.push_str(&render_match(m));
                }
                for s in &r.stmts {
                    out.push(' ');
                    out.push_str(&render_stmt(s));
                }
                if let Some(comment) = &r.comment {
                    let clean: String = comment
                        .chars()
                        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
                        .take(128)
                        .collect();
                    let _ = write!(out, " comment \"{clean}\"");
                }
                out.push('\n');
            }
        }
        Ok(out)
    }
}

fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Goto(c) => format!("goto {c}"),
    }
}

fn render_match(m: &Match) -> String {
    match m {
        Match::SrcIn(c) => format!("ip saddr {c}"),
        Match::SrcNotIn(c) => format!("ip saddr != {c}"),
        Match::DstIn(c) => format!("ip daddr {c}"),
        Match::DstNotIn(c) => format!("ip daddr != {c}"),
        Match::Proto(p) => format!("meta l4proto {p}"),
        Match::DstPort(p) => format!("th dport {p}"),
        Match::MarkSet(m) => format!("meta mark & {m:#x} == {m:#x}"),
        Match::DstLocal => "fib daddr type local".into(),
        Match::CtNew => "ct state new".into(),
        Match::SrcInSet(s) => format!("ip saddr @{s}"),
        Match::SrcDstInSet(s) => format!("ip saddr . ip daddr @{s}"),
        Match::CtDnat => "ct status dnat".into(),
    }
}

fn render_stmt(s: &Stmt) -> String {
    match s {
        Stmt::Counter => "counter".into(),
        Stmt::OrMark(m) => format!("meta mark set meta mark | {m:#x}"),
        Stmt::Dnat {
            addr,
            port: Some(p),
        } => format!("dnat ip to {addr}:{p}"),
        Stmt::Dnat { addr, port: None } => format!("dnat ip to {addr}"),
        Stmt::Masquerade => "masquerade".into(),
        Stmt::Reject(RejectKind::PortUnreachable) => "reject".into(),
        Stmt::Reject(RejectKind::TcpReset) => "reject with tcp reset".into(),
        Stmt::DispatchMap(m) => format!("ip daddr . meta l4proto . th dport vmap @{m}"),
        Stmt::Spread(targets) if targets.len() == 1 => format!("goto {}", targets[0]),
        Stmt::Spread(targets) => {
            let arms: Vec<String> = targets
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{i} : goto {t}"))
                .collect();
            format!(
                "numgen random mod {} vmap {{ {} }}",
                targets.len(),
                arms.join(", ")
            )
        }
        Stmt::Verdict(v) => verdict(v),
        Stmt::UpdateSrcSet(s) => format!("update @{s} {{ ip saddr }}"),
        Stmt::DnatSpread(b) if b.len() == 1 => format!("dnat ip to {}:{}", b[0].0, b[0].1),
        Stmt::DnatSpread(b) => {
            let mut out = format!("dnat ip to numgen random mod {} map {{ ", b.len());
            for (i, (a, p)) in b.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{i} : {a} . {p}");
            }
            out.push_str(" }");
            out
        }
    }
}

/// Table, chain and map names: 1..=64 bytes of letters, digits, `_`, `-`, `.`, starting with a
/// letter or `_` (nft's identifier syntax, kept strict so nothing needs quoting).
fn check_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(NetError::invalid(
            name,
            "nftables names here are 1..=64 letters, digits, '_', '-', '.', starting with a letter or '_'",
        ))
    }
}

/// The masquerade base chain for pod traffic leaving the cluster: `ip saddr POD ip daddr !=
/// CLUSTER masquerade`, hooked at postrouting (srcnat). Traffic marked with `mark` (for hairpin
/// and other cases the proxy decides) is masqueraded as well.
pub fn pod_masquerade_chain(
    name: &str,
    pod_cidr: Ipv4Cidr,
    cluster_cidr: Ipv4Cidr,
    mark: Option<u32>,
) -> Chain {
    let mut rules = vec![Rule {
        matches: vec![Match::SrcIn(pod_cidr), Match::DstNotIn(cluster_cidr)],
        stmts: vec![Stmt::Masquerade],
        comment: Some("pod traffic leaving the cluster".into()),
    }];
    if let Some(m) = mark {
        rules.push(Rule {
            matches: vec![Match::MarkSet(m)],
            stmts: vec![Stmt::Masquerade],
            comment: Some("marked for masquerade".into()),
        });
    }
    Chain {
        name: name.to_string(),
        base: Some(BaseChain {
            kind: ChainKind::Nat,
            hook: Hook::Postrouting,
            priority: 100,
            policy: Policy::Accept,
        }),
        rules,
    }
}

/// Runs `nft` (in a chosen network namespace).
#[derive(Debug)]
pub struct Nft {
    binary: PathBuf,
    netns: Option<OwnedFd>,
}

impl Nft {
    /// `nft` from PATH, in the caller's network namespace.
    pub fn new() -> Nft {
        Nft {
            binary: PathBuf::from("nft"),
            netns: None,
        }
    }

    /// `nft` run inside the network namespace at `path` (tests use namespaces they created).
    pub fn in_netns(path: &Path) -> Result<Nft, NetError> {
        Ok(Nft {
            binary: PathBuf::from("nft"),
            netns: Some(crate::netlink::open_netns(path)?),
        })
    }

    /// Writes `value` to the sysctl file `path` (under `/proc/sys/net`) in this `nft`'s network
    /// namespace (a sysctl that rules depend on, such as `route_localnet`); returns what it held.
    pub fn write_sysctl(&self, path: &str, value: &str) -> Result<String, NetError> {
        let write = || {
            let had = std::fs::read_to_string(path)
                .map_err(|e| NetError::io(format!("read {path}"), e))?;
            if had.trim() != value {
                std::fs::write(path, value)
                    .map_err(|e| NetError::io(format!("write {value} to {path}"), e))?;
            }
            Ok(had.trim().to_string())
        };
        match &self.netns {
            None => write(),
            // A thread of its own enters the namespace, so the caller's stays as it was.
            Some(fd) => std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetError::io("enter the network namespace (setns)", e))?;
                    write()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(NetError::io(
                        "sysctl thread",
                        std::io::Error::other("panicked"),
                    ))
                })
            }),
        }
    }

    /// Replaces the whole content of `table` atomically (one nft transaction).
    pub fn apply(&self, table: &Table) -> Result<(), NetError> {
        let started = Instant::now();
        let batch = table.render()?;
        self.run(
            &["-f", "-"],
            Some(&batch),
            &format!("apply table {} {}", table.family, table.name),
        )?;
        tracing::debug!(
            table = %table.name,
            chains = table.chains.len(),
            bytes = batch.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "nftables table applied"
        );
        Ok(())
    }

    /// Deletes table `name` if it exists (no other table is touched).
    pub fn delete_table(&self, family: Family, name: &str) -> Result<(), NetError> {
        check_name(name)?;
        let batch = format!("add table {family} {name}\ndelete table {family} {name}\n");
        self.run(
            &["-f", "-"],
            Some(&batch),
            &format!("delete table {family} {name}"),
        )
        .map(|_| ())
    }

    /// `nft -j list table FAMILY NAME`, parsed; None when the table does not exist.
    pub fn list_json(
        &self,
        family: Family,
        name: &str,
    ) -> Result<Option<serde_json::Value>, NetError> {
        check_name(name)?;
        if !self.table_exists(family, name)? {
            return Ok(None);
        }
        let out = self.run(
            &["-j", "list", "table", &family.to_string(), name],
            None,
            &format!("list table {family} {name}"),
        )?;
        serde_json::from_str(&out)
            .map(Some)
            .map_err(|e| NetError::Nft {
                op: format!("parse the listing of table {family} {name}"),
                status: "0".into(),
                stderr: e.to_string(),
            })
    }

    /// `nft list table FAMILY NAME` as text; None when the table does not exist.
    pub fn list_text(&self, family: Family, name: &str) -> Result<Option<String>, NetError> {
        check_name(name)?;
        if !self.table_exists(family, name)? {
            return Ok(None);
        }
        self.run(
            &["list", "table", &family.to_string(), name],
            None,
            &format!("list table {family} {name}"),
        )
        .map(Some)
    }

    /// Whether table `name` exists.
    pub fn table_exists(&self, family: Family, name: &str) -> Result<bool, NetError> {
        let out = self.run(
            &["list", "tables", &family.to_string()],
            None,
            "list tables",
        )?;
        let wanted = format!("table {family} {name}");
        Ok(out.lines().any(|l| l.trim() == wanted))
    }

    fn run(&self, args: &[&str], stdin: Option<&str>, op: &str) -> Result<String, NetError> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fd) = &self.netns {
            let fd = fd
                .try_clone()
                .map_err(|e| NetError::io("duplicate the netns fd", e))?;
            // SAFETY: the hook runs in the forked child before exec and only calls setns(2),
            // which is async-signal-safe; it allocates nothing and takes no locks.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            NetError::io(
                format!(
                    "{op}: run {} (install the nftables package)",
                    self.binary.display()
                ),
                e,
            )
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| NetError::io(format!("{op}: write to nft"), e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NetError::io(format!("{op}: wait for nft"), e))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(NetError::Nft {
                op: op.to_string(),
                status: out.status.to_string(),
                stderr: stderr.chars().take(4000).collect(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Default for Nft {
    fn default() -> Self {
        Nft::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(Family::Inet, "skiff_t");
        t.chains.push(Chain {
            name: "nat-output".into(),
            base: Some(BaseChain {
                kind: ChainKind::Nat,
                hook: Hook::Output,
                priority: -100,
                policy: Policy::Accept,
            }),
            rules: vec![Rule {
                stmts: vec![Stmt::DispatchMap("services".into())],
                ..Rule::default()
            }],
        });
        for ep in ["ep-a", "ep-b"] {
            t.chains.push(Chain {
                name: ep.into(),
                base: None,
                rules: vec![Rule {
                    stmts: vec![Stmt::Dnat {
                        addr: Ipv4Addr::new(10, 42, 0, 2),
                        port: Some(8080),
                    }],
                    comment: Some("a \"quoted\" comment".into()),
                    ..Rule::default()
                }],
            });
        }
        t.chains.push(Chain {
            name: "svc-x".into(),
            base: None,
            rules: vec![Rule {
                stmts: vec![Stmt::Spread(vec!["ep-a".into(), "ep-b".into()])],
                ..Rule::default()
            }],
        });
        t.maps.push(Map {
            name: "services".into(),
            elements: vec![(
                ServiceKey {
                    addr: Ipv4Addr::new(10, 43, 0, 10),
                    proto: Proto::Tcp,
                    port: 80,
                },
                Verdict::Goto("svc-x".into()),
            )],
        });
        t
    }

    #[test]
    fn renders_one_replacing_batch() {
        let text = sample().render().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "add table inet skiff_t");
        assert_eq!(lines[1], "delete table inet skiff_t");
        assert_eq!(lines[2], "add table inet skiff_t");
        assert!(text.contains(
            "add chain inet skiff_t nat-output { type nat hook output priority -100; policy accept; }"
        ));
        assert!(text.contains("elements = { 10.43.0.10 . tcp . 80 : goto svc-x }"));
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto ep-a, 1 : goto ep-b }"));
        assert!(text.contains("dnat ip to 10.42.0.2:8080 comment \"a quoted comment\""));
        // chains before maps before rules
        let first_map = text.find("add map").unwrap();
        assert!(text.rfind("add chain").unwrap() < first_map);
        assert!(text.find("add rule").unwrap() > first_map);
    }

    #[test]
    fn refuses_bad_names_and_dangling_references() {
        let mut t = sample();
        t.name = "bad name".into();
        assert!(t.render().is_err());
        let mut t = sample();
        t.maps[0].elements[0].1 = Verdict::Goto("missing".into());
        assert!(t.render().is_err());
        let mut t = sample();
        t.chains[3].rules[0].stmts = vec![Stmt::Spread(vec![])];
        assert!(t.render().is_err());
        let mut t = sample();
        t.chains[0].rules[0].stmts = vec![Stmt::DispatchMap("nomap".into())];
        assert!(t.render().is_err());
    }
}
