//! One 16-byte address layout for both families.

/// An address as its 16 bytes in network order (bpftool prints them as a
/// byte list). IPv4 is IPv4-mapped: `::ffff:a.b.c.d`, so the last four bytes
/// read as the dotted quad.
pub type RawAddr = [u8; 16];

/// Maps an IPv4 address word (the 4 packet bytes read as a native `u32`).
#[inline(always)]
pub const fn from_v4_word(word: u32) -> RawAddr {
    let b = word.to_ne_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]]
}

/// The IPv4 address word of an IPv4-mapped `RawAddr`, or `None` for IPv6.
#[inline(always)]
pub const fn v4_word(addr: &RawAddr) -> Option<u32> {
    let a = addr;
    if a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0 && a[10] == 0xff && a[11] == 0xff {
        Some(u32::from_ne_bytes([a[12], a[13], a[14], a[15]]))
    } else {
        None
    }
}

/// The `RawAddr` of an address (IPv4 as IPv4-mapped).
pub fn from_ip(ip: core::net::IpAddr) -> RawAddr {
    match ip {
        core::net::IpAddr::V4(v4) => from_v4_word(u32::from_ne_bytes(v4.octets())),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a `RawAddr` holds (an IPv4-mapped one as IPv4).
pub fn to_ip(raw: &RawAddr) -> core::net::IpAddr {
    match v4_word(raw) {
        Some(word) => core::net::IpAddr::from(word.to_ne_bytes()),
        None => core::net::IpAddr::from(*raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip() {
        for ip in ["198.18.0.1", "0.0.0.0", "fd00::1", "::"] {
            let ip: core::net::IpAddr = ip.parse().unwrap();
            assert_eq!(to_ip(&from_ip(ip)), ip);
        }
        let v4: core::net::IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(from_ip(v4)[10..], [0xff, 0xff, 198, 18, 0, 1]);
    }
}
