//! Link work over rtnetlink: bridges, veth pairs, addresses, and fresh network namespaces.
//!
//! Every call runs on its own short-lived thread with a current-thread tokio runtime, so it works
//! from sync code and from inside an async runtime alike, and so that a thread can switch network
//! namespace (`setns`/`unshare` of the net namespace is per thread) without touching the caller.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use futures::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::LabError;

/// Which network namespace a netlink job runs in.
pub(crate) enum Netns<'a> {
    /// The caller's.
    Current,
    /// An existing one, entered with setns.
    Enter(BorrowedFd<'a>),
}

/// Runs `job` with a netlink handle bound to `netns`, on a scoped thread.
pub(crate) fn run<T, F, Fut>(netns: Netns<'_>, job: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, LabError>>,
{
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            if let Netns::Enter(fd) = netns {
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| LabError::io("setns into the node's network namespace", e))?;
            }
            block_on(job)
        });
        worker.join().unwrap_or_else(|_| {
            Err(LabError::io(
                "netlink worker",
                std::io::Error::other("panicked"),
            ))
        })
    })
}

fn block_on<T, F, Fut>(job: F) -> Result<T, LabError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, LabError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LabError::io("start a netlink runtime", e))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| LabError::io("open a netlink socket", e))?;
        tokio::spawn(conn);
        job(handle).await
    })
}

/// Creates a fresh network namespace with `lo` up and returns a handle that keeps it alive.
pub(crate) fn new_netns() -> Result<OwnedFd, LabError> {
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| LabError::io("unshare a network namespace", e))?;
            let fd = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| LabError::io("open /proc/thread-self/ns/net", e))?;
            block_on(|h| async move { set_up(&h, "lo").await })?;
            Ok(OwnedFd::from(fd))
        });
        worker.join().unwrap_or_else(|_| {
            Err(LabError::io(
                "netns worker",
                std::io::Error::other("panicked"),
            ))
        })
    })
}

/// The index of link `name`, or None when there is no such link.
pub(crate) async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, LabError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        // The kernel answers ENODEV for a name lookup that matches nothing.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
        Err(e) => Err(LabError::netlink(format!("look up link {name}"), e)),
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

async fn must_index(h: &Handle, name: &str) -> Result<u32, LabError> {
    link_index(h, name)
        .await?
        .ok_or_else(|| LabError::NoSuchLink {
            name: name.to_string(),
        })
}

async fn set_up(h: &Handle, name: &str) -> Result<(), LabError> {
    h.link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .map_err(|e| LabError::netlink(format!("set link {name} up"), e))
}

async fn add_addr(h: &Handle, name: &str, ip: Ipv4Addr, prefix: u8) -> Result<(), LabError> {
    let index = must_index(h, name).await?;
    h.address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
        .map_err(|e| LabError::netlink(format!("add address {ip}/{prefix} to {name}"), e))
}

/// Creates bridge `name` with address `ip/prefix`, up. Fails if the name is taken.
pub(crate) async fn create_bridge(
    h: &Handle,
    name: &str,
    ip: Ipv4Addr,
    prefix: u8,
) -> Result<(), LabError> {
    if link_index(h, name).await?.is_some() {
        return Err(LabError::Exists {
            name: name.to_string(),
        });
    }
    h.link()
        .add(LinkBridge::new(name).up().build())
        .execute()
        .await
        .map_err(|e| LabError::netlink(format!("create bridge {name}"), e))?;
    let configured = add_addr(h, name, ip, prefix).await;
    if configured.is_err() {
        let _ = delete_link(h, name).await;
    }
    configured
}

/// Deletes link `name` if it exists (deleting one end of a veth pair deletes both).
pub(crate) async fn delete_link(h: &Handle, name: &str) -> Result<(), LabError> {
    let Some(index) = link_index(h, name).await? else {
        return Ok(());
    };
    h.link()
        .del(index)
        .execute()
        .await
        .map_err(|e| LabError::netlink(format!("delete link {name}"), e))
}

/// Creates veth `host`/`peer`, attaches `host` to `bridge` and sets it up, and moves `peer`
/// into the namespace `netns`. Leaves nothing behind on failure.
pub(crate) async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    bridge: &str,
    netns: BorrowedFd<'_>,
) -> Result<(), LabError> {
    let bridge_index = must_index(h, bridge).await?;
    for name in [host, peer] {
        if link_index(h, name).await?.is_some() {
            return Err(LabError::Exists {
                name: name.to_string(),
            });
        }
    }
    h.link()
        .add(LinkVeth::new(host, peer).build())
        .execute()
        .await
        .map_err(|e| LabError::netlink(format!("create veth pair {host}/{peer}"), e))?;
    let wired = async {
        h.link()
            .set(
                LinkUnspec::new_with_name(host)
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| LabError::netlink(format!("attach {host} to bridge {bridge}"), e))?;
        h.link()
            .set(
                LinkUnspec::new_with_name(peer)
                    .setns_by_fd(netns.as_fd().as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| LabError::netlink(format!("move {peer} into the node's namespace"), e))
    }
    .await;
    if wired.is_err() {
        let _ = delete_link(h, host).await;
    }
    wired
}

/// Inside a node's namespace: renames `peer` to `ifname`, gives it `ip/prefix`, sets it up and,
/// with a gateway, adds a default route through it.
pub(crate) async fn configure_peer(
    h: &Handle,
    peer: &str,
    ifname: &str,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
) -> Result<(), LabError> {
    let index = must_index(h, peer).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).name(ifname).build())
        .execute()
        .await
        .map_err(|e| LabError::netlink(format!("rename {peer} to {ifname}"), e))?;
    add_addr(h, ifname, ip, prefix).await?;
    set_up(h, ifname).await?;
    if let Some(gw) = gateway {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .gateway(gw)
            .build();
        h.route()
            .add(route)
            .execute()
            .await
            .map_err(|e| LabError::netlink(format!("add default route via {gw}"), e))?;
    }
    Ok(())
}

/// Parses `a.b.c.d/n` (IPv4 only).
pub(crate) fn parse_cidr(input: &str) -> Result<(Ipv4Addr, u8), LabError> {
    let bad = || LabError::InvalidAddr {
        input: input.to_string(),
    };
    let (ip, prefix) = input.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((ip, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_cidrs() {
        assert_eq!(
            parse_cidr("10.99.0.2/24").unwrap(),
            (Ipv4Addr::new(10, 99, 0, 2), 24)
        );
        for bad in [
            "10.99.0.2",
            "10.99.0.2/33",
            "fd00::1/64",
            "x/24",
            "10.0.0.1/",
        ] {
            assert!(
                matches!(parse_cidr(bad), Err(LabError::InvalidAddr { .. })),
                "{bad}"
            );
        }
    }
}
