//! The one nf_tables ruleset a machine needs, sent as an nfnetlink batch (the static
//! agent cannot exec `nft`): masquerade what leaves the containers' bridge subnet for any
//! other interface, as docker's default bridge does.
//!
//! ```text
//! table ip hearth {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr SUBNET oifname != "BRIDGE" masquerade
//!     }
//! }
//! ```
//!
//! Constants are those of `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nf_tables.h`; nf_tables' numbers are big-endian on the wire.

use std::net::Ipv4Addr;

use super::netlink::{NlMsg, NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
/// `NFPROTO_IPV4`.
const FAMILY_IPV4: u8 = 2;
/// `NF_INET_POST_ROUTING`.
const HOOK_POSTROUTING: u32 = 4;
/// `NF_IP_PRI_NAT_SRC` ("srcnat").
const PRIORITY_SRCNAT: u32 = 100;
/// `NF_ACCEPT`.
const POLICY_ACCEPT: u32 = 1;
/// Interface names are compared over `IFNAMSIZ` bytes, NUL-padded (as `nft` does).
const IFNAMSIZ: usize = 16;

pub const TABLE: &str = "hearth";
pub const CHAIN: &str = "postrouting";

/// `struct nfgenmsg`: family, version 0, resource id (big-endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let id = res_id.to_be_bytes();
    [family, 0, id[0], id[1]]
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn batch_marker(kind: u16, seq: u32) -> Vec<u8> {
    let mut m = NlMsg::new(kind, NLM_F_REQUEST, seq);
    m.header(&nfgenmsg(libc::AF_UNSPEC as u8, NFNL_SUBSYS_NFTABLES));
    m.finish()
}

/// One expression of a rule: its name and its attributes, built by `data`.
fn expr(m: &mut NlMsg, name: &str, data: impl FnOnce(&mut NlMsg)) {
    m.begin(NLA_F_NESTED | NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, name)
        .begin(NLA_F_NESTED | NFTA_EXPR_DATA);
    data(m);
    m.end().end();
}

fn data_value(m: &mut NlMsg, kind: u16, value: &[u8]) {
    m.begin(NLA_F_NESTED | kind)
        .attr(NFTA_DATA_VALUE, value)
        .end();
}

/// The masquerade ruleset for `subnet/prefix` behind `bridge`, as one batch, and the
/// sequence numbers of the three messages the kernel acknowledges. Sequence numbers
/// start at `seq`.
pub fn masquerade_batch(
    seq: u32,
    subnet: Ipv4Addr,
    prefix: u8,
    bridge: &str,
) -> (Vec<u8>, [u32; 3]) {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
    let mut batch = batch_marker(NFNL_MSG_BATCH_BEGIN, seq);

    let mut table = NlMsg::new(nft_type(NFT_MSG_NEWTABLE), flags, seq + 1);
    table
        .header(&nfgenmsg(FAMILY_IPV4, 0))
        .attr_str(NFTA_TABLE_NAME, TABLE);
    batch.extend(table.finish());

    let mut chain = NlMsg::new(nft_type(NFT_MSG_NEWCHAIN), flags, seq + 2);
    chain
        .header(&nfgenmsg(FAMILY_IPV4, 0))
        .attr_str(NFTA_CHAIN_TABLE, TABLE)
        .attr_str(NFTA_CHAIN_NAME, CHAIN)
        .begin(NLA_F_NESTED | NFTA_CHAIN_HOOK)
        .attr_be32(NFTA_HOOK_HOOKNUM, HOOK_POSTROUTING)
        .attr_be32(NFTA_HOOK_PRIORITY, PRIORITY_SRCNAT)
        .end()
        .attr_be32(NFTA_CHAIN_POLICY, POLICY_ACCEPT)
        .attr_str(NFTA_CHAIN_TYPE, "nat");
    batch.extend(chain.finish());

    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    let network = u32::from(subnet) & mask;
    let mut ifname = [0u8; IFNAMSIZ];
    for (dst, src) in ifname.iter_mut().zip(bridge.bytes().take(IFNAMSIZ - 1)) {
        *dst = src;
    }
    let mut rule = NlMsg::new(nft_type(NFT_MSG_NEWRULE), flags, seq + 3);
    rule.header(&nfgenmsg(FAMILY_IPV4, 0))
        .attr_str(NFTA_RULE_TABLE, TABLE)
        .attr_str(NFTA_RULE_CHAIN, CHAIN)
        .begin(NLA_F_NESTED | NFTA_RULE_EXPRESSIONS);
    // ip saddr: 4 bytes at offset 12 of the IPv4 header.
    expr(&mut rule, "payload", |m| {
        m.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
            .attr_be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
            .attr_be32(NFTA_PAYLOAD_OFFSET, 12)
            .attr_be32(NFTA_PAYLOAD_LEN, 4);
    });
    expr(&mut rule, "bitwise", |m| {
        m.attr_be32(NFTA_BITWISE_SREG, NFT_REG_1)
            .attr_be32(NFTA_BITWISE_DREG, NFT_REG_1)
            .attr_be32(NFTA_BITWISE_LEN, 4);
        data_value(m, NFTA_BITWISE_MASK, &mask.to_be_bytes());
        data_value(m, NFTA_BITWISE_XOR, &[0; 4]);
    });
    expr(&mut rule, "cmp", |m| {
        m.attr_be32(NFTA_CMP_SREG, NFT_REG_1)
            .attr_be32(NFTA_CMP_OP, NFT_CMP_EQ);
        data_value(m, NFTA_CMP_DATA, &network.to_be_bytes());
    });
    expr(&mut rule, "meta", |m| {
        m.attr_be32(NFTA_META_KEY, NFT_META_OIFNAME)
            .attr_be32(NFTA_META_DREG, NFT_REG_1);
    });
    expr(&mut rule, "cmp", |m| {
        m.attr_be32(NFTA_CMP_SREG, NFT_REG_1)
            .attr_be32(NFTA_CMP_OP, NFT_CMP_NEQ);
        data_value(m, NFTA_CMP_DATA, &ifname);
    });
    expr(&mut rule, "masq", |_| {});
    rule.end();
    batch.extend(rule.finish());

    batch.extend(batch_marker(NFNL_MSG_BATCH_END, seq + 4));
    (batch, [seq + 1, seq + 2, seq + 3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize((v.len() + 3) & !3, 0);
        v
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(0x8000 | kind, &parts.concat())
    }

    fn be(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    fn msg(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v
    }

    fn elem(name: &[u8], data: &[Vec<u8>]) -> Vec<u8> {
        nested(1, &[attr(1, name), nested(2, data)])
    }

    /// The batch spelled out field by field from nf_tables.h: what `nft -f` sends for
    /// the ruleset in the module comment (modulo sequence numbers and the handle-less
    /// flags nft adds).
    #[test]
    fn masquerade_batch_bytes() {
        let (got, acks) = masquerade_batch(100, Ipv4Addr::new(172, 30, 9, 9), 16, "hearth0");
        assert_eq!(acks, [101, 102, 103]);
        let f = 0x1 | 0x4 | 0x400;
        let gen4 = [2u8, 0, 0, 0];
        let begin = msg(0x10, 1, 100, &[0, 0, 0, 10]);
        let table = msg(
            0x0a00,
            f,
            101,
            &[gen4.to_vec(), attr(1, b"hearth\0")].concat(),
        );
        let chain = msg(
            0x0a03,
            f,
            102,
            &[
                gen4.to_vec(),
                attr(1, b"hearth\0"),
                attr(3, b"postrouting\0"),
                nested(4, &[attr(1, &be(4)), attr(2, &be(100))]),
                attr(5, &be(1)),
                attr(7, b"nat\0"),
            ]
            .concat(),
        );
        let exprs = nested(
            4,
            &[
                elem(
                    b"payload\0",
                    &[
                        attr(1, &be(1)),
                        attr(2, &be(1)),
                        attr(3, &be(12)),
                        attr(4, &be(4)),
                    ],
                ),
                elem(
                    b"bitwise\0",
                    &[
                        attr(1, &be(1)),
                        attr(2, &be(1)),
                        attr(3, &be(4)),
                        nested(4, &[attr(1, &[255, 255, 0, 0])]),
                        nested(5, &[attr(1, &[0, 0, 0, 0])]),
                    ],
                ),
                elem(
                    b"cmp\0",
                    &[
                        attr(1, &be(1)),
                        attr(2, &be(0)),
                        nested(3, &[attr(1, &[172, 30, 0, 0])]),
                    ],
                ),
                elem(b"meta\0", &[attr(2, &be(7)), attr(1, &be(1))]),
                elem(
                    b"cmp\0",
                    &[
                        attr(1, &be(1)),
                        attr(2, &be(1)),
                        nested(3, &[attr(1, b"hearth0\0\0\0\0\0\0\0\0\0")]),
                    ],
                ),
                elem(b"masq\0", &[]),
            ],
        );
        let rule = msg(
            0x0a06,
            f,
            103,
            &[
                gen4.to_vec(),
                attr(1, b"hearth\0"),
                attr(2, b"postrouting\0"),
                exprs,
            ]
            .concat(),
        );
        let end = msg(0x11, 1, 104, &[0, 0, 0, 10]);
        let want = [begin, table, chain, rule, end].concat();
        assert_eq!(got, want);
    }

    #[test]
    fn prefix_zero_masks_everything() {
        let (a, _) = masquerade_batch(1, Ipv4Addr::new(10, 0, 0, 1), 0, "b");
        let (b, _) = masquerade_batch(1, Ipv4Addr::new(0, 0, 0, 0), 0, "b");
        assert_eq!(a, b);
    }

    /// The batch is accepted by a real kernel (in a namespace of the test's own).
    #[test]
    fn kernel_accepts_the_batch() {
        if !crate::agent::init::testutil::is_root() {
            return;
        }
        let result = std::thread::spawn(|| {
            // SAFETY: unshare of the network namespace affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Ok(());
            }
            // A host kernel without nfnetlink cannot check it.
            let Ok(mut nl) = super::super::netlink::Netlink::open(libc::NETLINK_NETFILTER) else {
                return Ok(());
            };
            let (batch, acks) = masquerade_batch(10, Ipv4Addr::new(172, 30, 0, 0), 16, "hearth0");
            match nl.transact(&batch, &acks, "add the NAT rules") {
                // Nor one without nf_tables for IPv4.
                Err(super::super::netlink::NetlinkError::Refused { source, .. })
                    if source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                {
                    Ok(())
                }
                other => other,
            }
        })
        .join()
        .unwrap();
        result.unwrap();
    }
}
