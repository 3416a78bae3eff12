//! A lab bridge: a Linux bridge the lab creates on the host and deletes when dropped.

use crate::{LabError, netlink};

/// A bridge owned by the lab; deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    name: String,
}

impl Bridge {
    /// Creates bridge `name` (at most 15 bytes) with address `addr` (`10.99.0.1/24`), up.
    /// Fails with [`LabError::Exists`] if a link of that name exists: the lab never adopts links.
    pub fn create(name: &str, addr: &str) -> Result<Bridge, LabError> {
        crate::require_root()?;
        check_ifname(name)?;
        let (ip, prefix) = netlink::parse_cidr(addr)?;
        netlink::run(netlink::Netns::Current, |h| async move {
            netlink::create_bridge(&h, name, ip, prefix).await
        })?;
        tracing::debug!(bridge = name, addr, "lab bridge created");
        Ok(Bridge {
            name: name.to_string(),
        })
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the bridge now, reporting failure (drop does the same, logging failure instead).
    pub fn delete(mut self) -> Result<(), LabError> {
        let name = std::mem::take(&mut self.name);
        delete_link(&name)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        if let Err(error) = delete_link(&self.name) {
            tracing::warn!(bridge = %self.name, %error, "could not delete lab bridge");
        }
    }
}

pub(crate) fn delete_link(name: &str) -> Result<(), LabError> {
    netlink::run(netlink::Netns::Current, |h| async move {
        netlink::delete_link(&h, name).await
    })?;
    tracing::debug!(link = name, "lab link deleted");
    Ok(())
}

/// Interface names: 1..=15 bytes, no '/', ':' or whitespace.
pub(crate) fn check_ifname(name: &str) -> Result<(), LabError> {
    let reason = if name.is_empty() {
        Some("an interface name must not be empty")
    } else if name.len() > 15 {
        Some("an interface name has at most 15 bytes")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("an interface name must not contain '/', ':' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LabError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("skl-0123abcd").is_ok());
        for bad in ["", "a-name-that-is-too-long", "a/b", "a b", "a:b"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
    }
}
