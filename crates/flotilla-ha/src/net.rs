//! The host side of VRRP: a raw IP socket for protocol 112 bound to one interface, and
//! gratuitous ARP through a packet socket.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::codec::{
    decode_ipv4, decode_ipv6, ChecksumMode, DropReason, Received, MULTICAST_V4, MULTICAST_V6,
    PROTO_VRRP, REQUIRED_TTL,
};

/// What the router needs to know about its interface.
#[derive(Debug, Clone)]
pub struct Interface {
    /// Name, e.g. `eth0`.
    pub name: String,
    /// Kernel index.
    pub index: u32,
    /// Hardware address.
    pub mac: [u8; 6],
    /// The source of our adverts: the primary IPv4 address, or for IPv6 the
    /// link-local one (RFC 9568 §5.1.2.1).
    pub addr: IpAddr,
}

impl Interface {
    /// Looks `name` up for an IPv4 (`v6 = false`) or IPv6 router; fails naming what is
    /// missing.
    pub fn lookup(name: &str, v6: bool) -> io::Result<Interface> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
        // SAFETY: `cname` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {name:?}"),
            ));
        }
        let mac_text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))?;
        let mut mac = [0u8; 6];
        for (i, part) in mac_text.trim().split(':').take(6).enumerate() {
            mac[i] = u8::from_str_radix(part, 16).unwrap_or(0);
        }
        let addr = primary_addr(name, v6)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "interface {name:?} has no {}",
                    if v6 {
                        "IPv6 link-local address"
                    } else {
                        "IPv4 address"
                    }
                ),
            )
        })?;
        Ok(Interface {
            name: name.to_owned(),
            index,
            mac,
            addr,
        })
    }
}

/// The first IPv4 address of `name` (the primary one: the kernel lists it first), or
/// its IPv6 link-local address.
fn primary_addr(name: &str, v6: bool) -> io::Result<Option<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; the list is freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned, alive until
        // freeifaddrs below.
        let ifa = unsafe { &*cur };
        // SAFETY: the kernel gives every entry a NUL-terminated interface name.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() == name.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: checked non-null just above; it points into the live list.
            let sa = unsafe { &*ifa.ifa_addr };
            if !v6 && i32::from(sa.sa_family) == libc::AF_INET {
                // SAFETY: the family is AF_INET, so the address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
                break;
            }
            if v6 && i32::from(sa.sa_family) == libc::AF_INET6 {
                // SAFETY: the family is AF_INET6, so the address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if a.segments()[0] & 0xffc0 == 0xfe80 {
                    found = Some(a.into());
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and no reference into the list outlives this.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// A raw socket speaking IP protocol 112 on one interface.
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    index: u32,
    v6: bool,
}

impl VrrpSocket {
    /// Opens the socket on `iface` for its address family: joins 224.0.0.18 (ff02::12)
    /// there, sends with TTL (hop limit) 255, does not loop its own multicast back.
    pub fn open(iface: &Interface) -> io::Result<VrrpSocket> {
        let v6 = iface.addr.is_ipv6();
        let proto = Some(Protocol::from(i32::from(PROTO_VRRP)));
        let s = Socket::new(
            if v6 { Domain::IPV6 } else { Domain::IPV4 },
            Type::RAW,
            proto,
        )?;
        s.bind_device(Some(iface.name.as_bytes()))?;
        match iface.addr {
            IpAddr::V4(a) => {
                s.set_multicast_ttl_v4(u32::from(REQUIRED_TTL))?;
                s.set_ttl_v4(u32::from(REQUIRED_TTL))?;
                s.set_multicast_loop_v4(false)?;
                s.set_multicast_if_v4(&a)?;
                s.join_multicast_v4_n(&MULTICAST_V4, &InterfaceIndexOrAddress::Index(iface.index))?;
            }
            IpAddr::V6(_) => {
                s.set_multicast_hops_v6(u32::from(REQUIRED_TTL))?;
                s.set_unicast_hops_v6(u32::from(REQUIRED_TTL))?;
                s.set_multicast_loop_v6(false)?;
                s.set_multicast_if_v6(iface.index)?;
                s.join_multicast_v6(&MULTICAST_V6, iface.index)?;
                // The hop limit and destination come beside the message, not in it.
                set_int(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)?;
                set_int(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
            }
        }
        s.set_nonblocking(true)?;
        Ok(VrrpSocket {
            // SAFETY: the socket is owned by the AsyncFd and closed only when it drops.
            fd: unsafe { AsyncFd::register(s)? },
            index: iface.index,
            v6,
        })
    }

    /// Receives and decodes one advert: the outer error is the socket's, the inner
    /// one why the packet was dropped.
    pub async fn recv_advert(
        &self,
        buf: &mut [u8],
        vrid: u8,
        accept: Option<ChecksumMode>,
    ) -> io::Result<Result<Received, DropReason>> {
        if !self.v6 {
            let n = self.recv(buf).await?;
            return Ok(decode_ipv4(&buf[..n], vrid, accept));
        }
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|s| recvmsg_v6(s.get_ref(), buf)) {
                Ok(r) => {
                    let (n, src, dst, hops) = r?;
                    return Ok(decode_ipv6(&buf[..n], src, dst, hops, vrid, accept));
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one VRRP message (the kernel adds the IP header) to `dst`.
    pub async fn send(&self, msg: &[u8], dst: IpAddr) -> io::Result<()> {
        let to = match dst {
            IpAddr::V4(a) => SockAddr::from(SocketAddr::from((a, 0))),
            IpAddr::V6(a) => SockAddr::from(SocketAddrV6::new(a, 0, 0, self.index)),
        };
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|s| s.get_ref().send_to(msg, &to)) {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet, IP header included.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|s| {
                // SAFETY: u8 and MaybeUninit<u8> have the same layout; recv only writes.
                let uninit = unsafe {
                    std::slice::from_raw_parts_mut(
                        buf.as_mut_ptr() as *mut MaybeUninit<u8>,
                        buf.len(),
                    )
                };
                s.get_ref().recv(uninit)
            });
            match r {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// A gratuitous ARP request for `vip` from `iface`'s hardware address, broadcast: every
/// neighbour updates its cache entry for the VIP to point at us.
pub fn gratuitous_arp(iface: &Interface, vip: Ipv4Addr) -> io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain socket(2) call with constant arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a socket we just opened and nothing else owns; dropping the
    // OwnedFd closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp.push(6);
    arp.push(4);
    arp.extend_from_slice(&1u16.to_be_bytes()); // request
    arp.extend_from_slice(&iface.mac);
    arp.extend_from_slice(&vip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&vip.octets());
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = iface.index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `arp` and `to` are live for the call and their lengths are the ones given.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            arp.as_ptr() as *const libc::c_void,
            arp.len(),
            0,
            &to as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_int(s: &Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain int option on a valid socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `recvmsg` on an IPv6 raw socket: bytes, source, destination (IPV6_PKTINFO) and hop
/// limit (IPV6_HOPLIMIT).
fn recvmsg_v6(s: &Socket, buf: &mut [u8]) -> io::Result<(usize, Ipv6Addr, Ipv6Addr, u8)> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in6 is plain old data; all zeroes is a valid value.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16]; // 128 bytes, aligned for cmsghdr
                                  // SAFETY: msghdr is plain old data; all zeroes (null pointers, zero lengths) is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut from as *mut libc::sockaddr_in6 as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in msg refers to live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let src = Ipv6Addr::from(from.sin6_addr.s6_addr);
    let (mut dst, mut hops) = (Ipv6Addr::UNSPECIFIED, 0u8);
    // SAFETY: the CMSG macros walk the control buffer the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_HOPLIMIT {
                hops = (*(libc::CMSG_DATA(c) as *const i32)).clamp(0, 255) as u8;
            } else if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_PKTINFO {
                let info = &*(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                dst = Ipv6Addr::from(info.ipi6_addr.s6_addr);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, src, dst, hops))
}

/// An unsolicited neighbour advertisement (RFC 4861 §7.2.6) for `vip` from `iface`'s
/// hardware address to all nodes, with the override flag: IPv6's gratuitous ARP.
pub fn unsolicited_na(iface: &Interface, vip: Ipv6Addr) -> io::Result<()> {
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.bind_device(Some(iface.name.as_bytes()))?;
    s.set_multicast_hops_v6(255)?;
    s.set_multicast_if_v6(iface.index)?;
    let mut na = Vec::with_capacity(32);
    na.push(136); // neighbour advertisement
    na.push(0);
    na.extend_from_slice(&[0, 0]); // checksum: the kernel fills it in for ICMPv6
    na.extend_from_slice(&[0x20, 0, 0, 0]); // override
    na.extend_from_slice(&vip.octets());
    na.push(2); // target link-layer address option
    na.push(1); // length in units of 8 bytes
    na.extend_from_slice(&iface.mac);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    s.send_to(
        &na,
        &SockAddr::from(SocketAddrV6::new(all_nodes, 0, 0, iface.index)),
    )?;
    Ok(())
}
