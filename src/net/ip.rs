//! Which addresses are public. Everything that is not plainly public is refused by default:
//! the special-purpose registries of IANA (RFC 6890 and its updates) for IPv4 and IPv6, with
//! IPv4 embedded in IPv6 (mapped, compatible, NAT64, 6to4) judged by its IPv4 part.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kinds of address the guard tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Globally routable.
    Public,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7.
    Private,
    /// 169.254/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// 100.64/10 (carrier-grade NAT).
    Shared,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 224/4, ff00::/8, 255.255.255.255.
    Multicast,
    /// Documentation, benchmarking, protocol assignments, 240/4 and the rest of the
    /// special-purpose ranges.
    Reserved,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Public => "public",
            Class::Loopback => "loopback",
            Class::Private => "private",
            Class::LinkLocal => "link-local",
            Class::Shared => "shared (carrier-grade NAT)",
            Class::Unspecified => "unspecified",
            Class::Multicast => "multicast or broadcast",
            Class::Reserved => "reserved",
        })
    }
}

/// The class of `addr`.
pub fn classify(addr: IpAddr) -> Class {
    match addr {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => classify_v6(a),
    }
}

fn classify_v4(a: Ipv4Addr) -> Class {
    let [o0, o1, o2, _] = a.octets();
    match (o0, o1, o2) {
        (0, ..) => Class::Unspecified,
        (127, ..) => Class::Loopback,
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => Class::Private,
        (169, 254, _) => Class::LinkLocal,
        (100, 64..=127, _) => Class::Shared,
        (224..=239, ..) => Class::Multicast,
        (255, 255, 255) if a == Ipv4Addr::BROADCAST => Class::Multicast,
        // IETF protocol assignments, TEST-NET-1/2/3, benchmarking, 6to4 relay anycast, 240/4.
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) | (198, 18..=19, _) | (192, 88, 99) => {
            Class::Reserved
        }
        (240..=255, ..) => Class::Reserved,
        _ => Class::Public,
    }
}

fn classify_v6(a: Ipv6Addr) -> Class {
    if a.is_unspecified() {
        return Class::Unspecified;
    }
    if a.is_loopback() {
        return Class::Loopback;
    }
    let s = a.segments();
    // IPv4-mapped ::ffff:a.b.c.d and the deprecated IPv4-compatible ::a.b.c.d.
    if let Some(v4) = a.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[..6] == [0; 6] {
        return classify_v4(embedded_v4(&s, 6));
    }
    // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48) and 6to4 (2002::/16).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded_v4(&s, 6));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Class::Private;
    }
    if s[0] == 0x2002 {
        return classify_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    match s[0] {
        0xfc00..=0xfdff => Class::Private,
        0xfe80..=0xfebf => Class::LinkLocal,
        // Site-local, deprecated but still routed to the local site by some stacks.
        0xfec0..=0xfeff => Class::Private,
        0xff00..=0xffff => Class::Multicast,
        // Documentation (2001:db8::/32 and 3fff::/20), discard-only (100::/64), Teredo and the
        // other IETF assignments under 2001::/23, ORCHID.
        0x2001 if s[1] == 0x0db8 || s[1] < 0x0200 => Class::Reserved,
        0x3fff if s[1] < 0x1000 => Class::Reserved,
        0x0100 if s[1..4] == [0, 0, 0] => Class::Reserved,
        // Global unicast is 2000::/3; everything else is unassigned.
        0x2000..=0x3fff => Class::Public,
        _ => Class::Reserved,
    }
}

fn embedded_v4(s: &[u16; 8], at: usize) -> Ipv4Addr {
    let (hi, lo) = (s[at], s[at + 1]);
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Class {
        classify(s.parse().expect("an address"))
    }

    #[test]
    fn cloud_metadata_and_private_ranges_are_refused() {
        for (addr, want) in [
            ("169.254.169.254", Class::LinkLocal),
            ("10.0.0.1", Class::Private),
            ("172.16.0.1", Class::Private),
            ("172.31.255.255", Class::Private),
            ("192.168.1.1", Class::Private),
            ("127.0.0.1", Class::Loopback),
            ("127.1.2.3", Class::Loopback),
            ("0.0.0.0", Class::Unspecified),
            ("100.64.0.1", Class::Shared),
            ("224.0.0.1", Class::Multicast),
            ("255.255.255.255", Class::Multicast),
            ("240.0.0.1", Class::Reserved),
            ("192.0.2.1", Class::Reserved),
            ("198.18.0.1", Class::Reserved),
            ("::1", Class::Loopback),
            ("::", Class::Unspecified),
            ("fe80::1", Class::LinkLocal),
            ("fd00::1", Class::Private),
            ("fc00::1", Class::Private),
            ("ff02::1", Class::Multicast),
            ("2001:db8::1", Class::Reserved),
            // IPv4 hidden in IPv6 is judged by its IPv4 part.
            ("::ffff:169.254.169.254", Class::LinkLocal),
            ("::ffff:127.0.0.1", Class::Loopback),
            ("::ffff:10.0.0.1", Class::Private),
            ("::10.0.0.1", Class::Private),
            ("64:ff9b::a9fe:a9fe", Class::LinkLocal),
            ("2002:a9fe:a9fe::1", Class::LinkLocal),
            ("2002:7f00:1::", Class::Loopback),
        ] {
            assert_eq!(class(addr), want, "{addr}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(class(addr), Class::Public, "{addr}");
        }
    }
}
