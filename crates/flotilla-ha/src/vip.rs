//! Adding and removing the virtual addresses through rtnetlink.

use futures::TryStreamExt;

use crate::config::Vip;

/// A netlink handle bound to one interface.
#[derive(Clone)]
pub struct VipControl {
    handle: rtnetlink::Handle,
    index: u32,
}

impl VipControl {
    /// Opens a netlink connection (its reader runs on the current runtime).
    pub fn open(index: u32) -> std::io::Result<VipControl> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(VipControl { handle, index })
    }

    /// Adds `vip` (replacing an identical entry, so a restart after a crash is fine).
    pub async fn add(&self, vip: Vip) -> Result<(), rtnetlink::Error> {
        let mut req = self
            .handle
            .address()
            .add(self.index, vip.addr, vip.prefix)
            .replace();
        if vip.addr.is_ipv6() {
            // No duplicate address detection: the address moves between peers by
            // design, and DAD would hold it unusable for a second after takeover.
            use rtnetlink::packet_route::address::AddressHeaderFlags;
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        req.execute().await
    }

    /// Removes `vip` if present.
    pub async fn remove(&self, vip: Vip) -> Result<(), rtnetlink::Error> {
        let mut found = self.find(vip, true);
        while let Some(msg) = found.try_next().await? {
            self.handle.address().del(msg).execute().await?;
        }
        Ok(())
    }

    /// True if `vip`'s address is on the interface (any prefix).
    pub async fn present(&self, vip: Vip) -> Result<bool, rtnetlink::Error> {
        Ok(self.find(vip, false).try_next().await?.is_some())
    }

    /// The interface's entries for `vip`'s address, with its prefix or any.
    fn find(
        &self,
        vip: Vip,
        same_prefix: bool,
    ) -> impl futures::Stream<
        Item = Result<rtnetlink::packet_route::address::AddressMessage, rtnetlink::Error>,
    > {
        let mut get = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(vip.addr);
        if same_prefix {
            get = get.set_prefix_length_filter(vip.prefix);
        }
        get.execute()
    }
}
