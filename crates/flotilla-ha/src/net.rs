//! The host side of VRRP: a raw IP socket for protocol 112 bound to one interface, and
//! gratuitous ARP through a packet socket.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::codec::{MULTICAST_V4, PROTO_VRRP, REQUIRED_TTL};

/// What the router needs to know about its interface.
#[derive(Debug, Clone)]
pub struct Interface {
    /// Name, e.g. `eth0`.
    pub name: String,
    /// Kernel index.
    pub index: u32,
    /// Hardware address.
    pub mac: [u8; 6],
    /// Primary IPv4 address: the source of our adverts.
    pub addr: Ipv4Addr,
}

impl Interface {
    /// Looks `name` up; fails naming what is missing.
    pub fn lookup(name: &str) -> io::Result<Interface> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
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
        let addr = primary_ipv4(name)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {name:?} has no IPv4 address"),
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

/// The first IPv4 address of `name` (the primary one: the kernel lists it first).
fn primary_ipv4(name: &str) -> io::Result<Option<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifname.to_bytes() == name.as_bytes() && !ifa.ifa_addr.is_null() {
            let sa = unsafe { &*ifa.ifa_addr };
            if i32::from(sa.sa_family) == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// A raw socket speaking IP protocol 112 on one interface.
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
}

impl VrrpSocket {
    /// Opens the socket on `iface`: joins 224.0.0.18 there, sends with TTL 255, does
    /// not loop its own multicast back.
    pub fn open(iface: &Interface) -> io::Result<VrrpSocket> {
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(PROTO_VRRP))),
        )?;
        s.bind_device(Some(iface.name.as_bytes()))?;
        s.set_multicast_ttl_v4(u32::from(REQUIRED_TTL))?;
        s.set_ttl_v4(u32::from(REQUIRED_TTL))?;
        s.set_multicast_loop_v4(false)?;
        s.set_multicast_if_v4(&iface.addr)?;
        s.join_multicast_v4_n(&MULTICAST_V4, &InterfaceIndexOrAddress::Index(iface.index))?;
        s.set_nonblocking(true)?;
        Ok(VrrpSocket {
            // SAFETY: the socket is owned by the AsyncFd and closed only when it drops.
            fd: unsafe { AsyncFd::register(s)? },
        })
    }

    /// Sends one VRRP message (the kernel adds the IP header) to `dst`.
    pub async fn send(&self, msg: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let to = SockAddr::from(SocketAddrV4::new(dst, 0));
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
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
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
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = iface.index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let r = unsafe {
        libc::sendto(
            fd,
            arp.as_ptr() as *const libc::c_void,
            arp.len(),
            0,
            &to as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}
