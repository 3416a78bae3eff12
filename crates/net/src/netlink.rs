//! Netlink plumbing: running rtnetlink jobs inside a chosen network namespace, and the small
//! link/address/route helpers the bridge and pod code share.
//!
//! Each job runs on its own short-lived thread with a current-thread tokio runtime: `setns` of the
//! network namespace is per thread, so switching namespaces never touches the caller's threads,
//! and the API stays usable from sync code and (through `spawn_blocking`) from async code.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use futures::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::Handle;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::NetError;

/// Opens a network namespace file (`/proc/<pid>/ns/net`, `/run/netns/<name>`, a bind mount).
pub(crate) fn open_netns(path: &Path) -> Result<OwnedFd, NetError> {
    let file = std::fs::File::open(path)
        .map_err(|e| NetError::io(format!("open network namespace {}", path.display()), e))?;
    Ok(OwnedFd::from(file))
}

/// Runs `job` with a netlink handle in namespace `netns` (None: the caller's), on a scoped thread.
pub(crate) fn run<T, F, Fut>(netns: Option<&OwnedFd>, job: F) -> Result<T, NetError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetError>>,
{
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            if let Some(fd) = netns {
                nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetError::io("enter a network namespace (setns)", e))?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetError::io("start a netlink runtime", e))?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| NetError::io("open a netlink socket", e))?;
                tokio::spawn(conn);
                job(handle).await
            })
        });
        worker.join().unwrap_or_else(|_| {
            Err(NetError::io(
                "netlink worker thread",
                std::io::Error::other("panicked"),
            ))
        })
    })
}

/// The link called `name`, or None.
pub(crate) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, NetError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(found) => Ok(found),
        // The kernel answers ENODEV for a name lookup that matches nothing.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(NetError::netlink(format!("look up link {name}"), e)),
    }
}

/// The link with index `index`, or None.
pub(crate) async fn link_by_index(h: &Handle, index: u32) -> Result<Option<LinkMessage>, NetError> {
    let mut links = h.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(found) => Ok(found),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(NetError::netlink(format!("look up link #{index}"), e)),
    }
}

pub(crate) async fn must_index(h: &Handle, name: &str) -> Result<u32, NetError> {
    link_by_name(h, name)
        .await?
        .map(|m| m.header.index)
        .ok_or_else(|| NetError::NoSuchLink {
            name: name.to_string(),
        })
}

pub(crate) fn link_mtu(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub(crate) fn link_mac(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    })
}

pub(crate) async fn set_up(h: &Handle, index: u32, what: &str) -> Result<(), NetError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("set {what} up"), e))
}

/// Whether link `index` carries IPv4 address `ip`.
pub(crate) async fn has_addr(h: &Handle, index: u32, ip: Ipv4Addr) -> Result<bool, NetError> {
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| NetError::netlink(format!("list addresses of link #{index}"), e))?
    {
        let found = msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(IpAddr::V4(x)) if *x == ip)
                || matches!(a, AddressAttribute::Local(IpAddr::V4(x)) if *x == ip)
        });
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

pub(crate) async fn add_addr(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
    what: &str,
) -> Result<(), NetError> {
    h.address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("add address {ip}/{prefix} to {what}"), e))
}

pub(crate) async fn delete_link(h: &Handle, name: &str) -> Result<bool, NetError> {
    let Some(link) = link_by_name(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        // Gone in the meantime (e.g. its peer was deleted): that is what we wanted.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(false)
        }
        Err(e) => Err(NetError::netlink(format!("delete link {name}"), e)),
    }
}

/// The MTU of the interface the IPv4 default route leaves by, if there is a default route.
pub(crate) async fn default_route_mtu(h: &Handle) -> Result<Option<u32>, NetError> {
    use rtnetlink::packet_route::route::RouteAttribute;
    let mut routes = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|e| NetError::netlink("list IPv4 routes", e))?
    {
        if route.header.destination_prefix_length != 0 {
            continue;
        }
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if let Some(oif) = oif
            && let Some(link) = link_by_index(h, oif).await?
        {
            return Ok(link_mtu(&link));
        }
    }
    Ok(None)
}
