//! Network addresses as the cluster uses them: a [`Vip`] and its [`Mac`].
//! Parsed once, where they enter (admin API, agent's wire), and typed from
//! there on; stored in the replicated state as the same strings as before.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

/// Why a text is not a MAC address; names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address like 01:00:5e:7f:00:0a")]
pub struct MacError(pub String);

impl Mac {
    /// Group bit set: switches flood it (or forward it by IGMP/MLD snooping),
    /// so every host of the VIP receives the frames.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// The cluster MAC a VIP gets unless the operator names one: 01:00:5e
    /// plus the low 23 bits of the (IPv4) address, the mapping of an IPv4
    /// multicast group (RFC 1112), so IGMP-snooping switches can be told
    /// about it; for IPv6, the low 32 bits after 33:33 (RFC 2464).
    pub fn for_vip(addr: IpAddr) -> Mac {
        match addr {
            IpAddr::V4(a) => {
                let b = a.octets();
                Mac([0x01, 0x00, 0x5e, b[1] & 0x7f, b[2], b[3]])
            }
            IpAddr::V6(a) => {
                let o = a.octets();
                Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
            }
        }
    }

    /// The IPv4 multicast group whose Ethernet mapping (RFC 1112) is this MAC,
    /// taken in the administratively scoped 239/8 range; `None` outside
    /// `01:00:5e:00:00:00`-`01:00:5e:7f:ff:ff`. Joining that group makes the
    /// NIC accept frames to the MAC and tells IGMP-snooping switches to
    /// forward them.
    pub fn igmp_group(&self) -> Option<Ipv4Addr> {
        let m = self.0;
        (m[0] == 0x01 && m[1] == 0x00 && m[2] == 0x5e && m[3] & 0x80 == 0)
            .then(|| Ipv4Addr::new(239, m[3], m[4], m[5]))
    }

    /// The IPv6 multicast group whose Ethernet mapping (RFC 2464) is this
    /// MAC, taken in site-local scope (`ff05::` + the low 32 bits) so that it
    /// never names a link-local group with a meaning of its own (`ff02::1`,
    /// the solicited-node groups); `None` unless the MAC starts with 33:33.
    pub fn mld_group(&self) -> Option<Ipv6Addr> {
        let m = self.0;
        (m[0] == 0x33 && m[1] == 0x33).then(|| {
            let low = u32::from_be_bytes([m[2], m[3], m[4], m[5]]);
            Ipv6Addr::from((0xff05_u128 << 112) | u128::from(low))
        })
    }

    /// Locally administered bit set: no vendor assigns it to a NIC, so a
    /// shared unicast MAC of that kind collides with no host's own.
    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 2 == 2
    }

    /// The shared unicast MAC of a VIP in [`SwitchMode::Unicast`] unless the
    /// operator names one: the default multicast MAC with the group bit
    /// cleared and the locally administered bit set (01:00:5e -> 02:00:5e,
    /// 33:33 -> 32:33).
    pub fn unicast_for_vip(addr: IpAddr) -> Mac {
        let mut m = Mac::for_vip(addr);
        m.0[0] = (m.0[0] & !1) | 2;
        m
    }

    /// The MAC a VIP gets in `mode` unless the operator names one.
    pub fn default_for(addr: IpAddr, mode: SwitchMode) -> Mac {
        match mode {
            SwitchMode::Multicast | SwitchMode::Igmp => Mac::for_vip(addr),
            SwitchMode::Unicast => Mac::unicast_for_vip(addr),
        }
    }
}

/// How the switches deliver a VIP's frames to every host, chosen per VIP by
/// the operator (deploy/NETWORK.md says which switch needs which).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SwitchMode {
    /// ARP/ND answer a multicast MAC; switches without snooping (or snooping
    /// by MAC, with the hosts' group joins) flood it.
    #[default]
    Multicast,
    /// As `Multicast`, and every host also joins the group mapped from the
    /// MAC and sends RFC 4286 Multicast Router Advertisements, so a switch
    /// snooping by IP destination treats its port as a router port and
    /// forwards the VIP's frames there.
    Igmp,
    /// ARP/ND answer a shared unicast MAC that no host ever uses as a frame
    /// source: switches never learn it and flood it as unknown unicast; each
    /// host receives it on a receive-only device carrying that MAC.
    Unicast,
}

/// A switch mode name that is not one; names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a switch mode: multicast, igmp or unicast")]
pub struct SwitchModeError(pub String);

impl SwitchMode {
    pub const ALL: [SwitchMode; 3] = [SwitchMode::Multicast, SwitchMode::Igmp, SwitchMode::Unicast];

    pub fn name(self) -> &'static str {
        match self {
            SwitchMode::Multicast => "multicast",
            SwitchMode::Igmp => "igmp",
            SwitchMode::Unicast => "unicast",
        }
    }

    pub fn is_multicast(&self) -> bool {
        *self == SwitchMode::Multicast
    }

    /// Whether `mac` can carry a VIP of `addr` in this mode; the error says
    /// what the mode needs.
    pub fn check_mac(self, addr: IpAddr, mac: Mac) -> Result<(), String> {
        let example = Mac::default_for(addr, self);
        match self {
            SwitchMode::Multicast if !mac.is_multicast() => Err(format!(
                "MAC {mac} must be a multicast MAC like {example} (mode multicast)"
            )),
            SwitchMode::Igmp => {
                let mapped = match addr {
                    IpAddr::V4(_) => mac.igmp_group().is_some(),
                    IpAddr::V6(_) => mac.mld_group().is_some(),
                };
                if mapped {
                    Ok(())
                } else {
                    Err(format!(
                        "MAC {mac} must map to a multicast group ({} for {addr}) in mode igmp, like {example}",
                        if addr.is_ipv4() { "01:00:5e:00:00:00-01:00:5e:7f:ff:ff" } else { "33:33:xx:xx:xx:xx" }
                    ))
                }
            }
            SwitchMode::Unicast if mac.is_multicast() || !mac.is_locally_administered() => {
                Err(format!(
                    "MAC {mac} must be a locally administered unicast MAC like {example} (mode unicast)"
                ))
            }
            _ => Ok(()),
        }
    }
}

impl FromStr for SwitchMode {
    type Err = SwitchModeError;

    fn from_str(s: &str) -> Result<Self, SwitchModeError> {
        SwitchMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| SwitchModeError(s.to_string()))
    }
}

impl fmt::Display for SwitchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mac {
    type Err = MacError;

    /// Six hex octets separated by ':' or '-', either case.
    fn from_str(s: &str) -> Result<Self, MacError> {
        let octets: Option<Vec<u8>> = s
            .split([':', '-'])
            .map(|p| {
                (p.len() == 2)
                    .then(|| u8::from_str_radix(p, 16).ok())
                    .flatten()
            })
            .collect();
        octets
            .and_then(|o| <[u8; 6]>::try_from(o).ok())
            .map(Mac)
            .ok_or_else(|| MacError(s.to_string()))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A shared virtual IP: the address the hosts hold together, its prefix and
/// the MAC their ARP/ND answers carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vip {
    pub address: IpAddr,
    pub prefix_len: u8,
    /// MAC answered in ARP/ND for this VIP: multicast, or in
    /// [`SwitchMode::Unicast`] the shared unicast MAC.
    pub mac: Mac,
    /// How switches deliver its frames to every host. Left out of the stored
    /// form when `multicast`, so entries written before modes existed read
    /// back unchanged (and the other way round).
    #[serde(default, skip_serializing_if = "SwitchMode::is_multicast")]
    pub mode: SwitchMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_refuse_with_the_text() {
        let m: Mac = "01:00:5E:7f:00:0A".parse().unwrap();
        assert_eq!(m.to_string(), "01:00:5e:7f:00:0a");
        assert_eq!("01-00-5e-7f-00-0a".parse::<Mac>(), Ok(m));
        assert!(m.is_multicast());
        assert!(!"02:00:00:00:00:01".parse::<Mac>().unwrap().is_multicast());
        for bad in [
            "",
            "01:00:5e:7f:00",
            "01:00:5e:7f:00:0a:0b",
            "1:0:5e:7f:0:a",
            "zz:00:5e:7f:00:0a",
        ] {
            assert_eq!(bad.parse::<Mac>(), Err(MacError(bad.into())), "{bad}");
        }
    }

    #[test]
    fn the_igmp_group_of_a_mac() {
        let g = |m: [u8; 6]| Mac(m).igmp_group();
        assert_eq!(
            g([0x01, 0x00, 0x5e, 0x0a, 0x0b, 0x0c]),
            Some(Ipv4Addr::new(239, 10, 11, 12))
        );
        assert_eq!(g([0x01, 0x00, 0x5e, 0x80, 0, 1]), None);
        assert_eq!(g([0x03, 0xbf, 0, 0, 0, 1]), None);
    }

    #[test]
    fn the_default_cluster_mac_maps_the_address_like_a_multicast_group() {
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(Mac::for_vip(v4).to_string(), "01:00:5e:00:02:0a");
        let hi: IpAddr = "10.200.1.2".parse().unwrap();
        assert_eq!(Mac::for_vip(hi).to_string(), "01:00:5e:48:01:02");
        let v6: IpAddr = "2001:db8::a:b".parse().unwrap();
        assert_eq!(Mac::for_vip(v6).to_string(), "33:33:00:0a:00:0b");
    }

    #[test]
    fn a_vip_is_stored_as_the_same_strings_as_before() {
        let v = Vip {
            address: "192.0.2.10".parse().unwrap(),
            prefix_len: 32,
            mac: "01:00:5e:00:02:0a".parse().unwrap(),
            mode: SwitchMode::Multicast,
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"{"address":"192.0.2.10","prefix_len":32,"mac":"01:00:5e:00:02:0a"}"#
        );
        assert_eq!(serde_json::from_str::<Vip>(&json).unwrap(), v);
        let bad = r#"{"address":"192.0.2.10","prefix_len":32,"mac":"nope"}"#;
        let e = serde_json::from_str::<Vip>(bad).unwrap_err().to_string();
        assert!(e.contains("\"nope\" is not a MAC address"), "{e}");
        let u = Vip {
            mac: Mac::unicast_for_vip(v.address),
            mode: SwitchMode::Unicast,
            ..v
        };
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(
            json,
            r#"{"address":"192.0.2.10","prefix_len":32,"mac":"02:00:5e:00:02:0a","mode":"unicast"}"#
        );
        assert_eq!(serde_json::from_str::<Vip>(&json).unwrap(), u);
        let bad =
            r#"{"address":"192.0.2.10","prefix_len":32,"mac":"02:00:5e:00:02:0a","mode":"flood"}"#;
        assert!(serde_json::from_str::<Vip>(bad).is_err());
    }

    #[test]
    fn switch_modes_parse_and_check_their_macs() {
        for m in SwitchMode::ALL {
            assert_eq!(m.name().parse::<SwitchMode>(), Ok(m));
        }
        assert_eq!(
            "Unicast".parse::<SwitchMode>(),
            Err(SwitchModeError("Unicast".into()))
        );
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::a:b".parse().unwrap();
        assert_eq!(Mac::unicast_for_vip(v4).to_string(), "02:00:5e:00:02:0a");
        assert_eq!(Mac::unicast_for_vip(v6).to_string(), "32:33:00:0a:00:0b");
        assert_eq!(
            Mac::for_vip(v6).mld_group(),
            Some("ff05::a:b".parse().unwrap())
        );
        for (mode, addr) in [
            (SwitchMode::Multicast, v4),
            (SwitchMode::Igmp, v4),
            (SwitchMode::Unicast, v4),
            (SwitchMode::Multicast, v6),
            (SwitchMode::Igmp, v6),
            (SwitchMode::Unicast, v6),
        ] {
            assert_eq!(mode.check_mac(addr, Mac::default_for(addr, mode)), Ok(()));
        }
        let e = SwitchMode::Unicast
            .check_mac(v4, Mac::for_vip(v4))
            .unwrap_err();
        assert!(
            e.contains("01:00:5e:00:02:0a") && e.contains("locally administered unicast"),
            "{e}"
        );
        let vendor: Mac = "00:11:22:33:44:55".parse().unwrap();
        assert!(SwitchMode::Unicast.check_mac(v4, vendor).is_err());
        let e = SwitchMode::Igmp
            .check_mac(v4, "03:00:00:00:00:01".parse().unwrap())
            .unwrap_err();
        assert!(e.contains("mode igmp"), "{e}");
        assert!(SwitchMode::Igmp.check_mac(v6, Mac::for_vip(v4)).is_err());
        assert!(SwitchMode::Multicast.check_mac(v4, vendor).is_err());
    }
}
