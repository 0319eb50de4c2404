//! A small typed model of the nftables rules Ember writes, rendered to the
//! text `nft -f` reads.
//!
//! Only what Ember's rulesets use is modelled. Rendering follows `nft list`'s
//! own layout (tabs, blank lines between chains, sets reduced as nft reduces
//! them), so a table read back from the kernel compares equal to its plan.
//! Which rules a slot or the host gets is decided in `plan`, not here.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;

use crate::cidr::AddrSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 only.
    Ip,
    /// IPv4 and IPv6 in one table.
    Inet,
}

impl Family {
    fn as_str(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Inet => "inet",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `None` for a regular chain reached only by `jump`/`goto`.
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

/// A base chain's attachment. The priority is the standard one for the
/// chain's kind and hook (`dstnat`, `srcnat`, `filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub kind: ChainKind,
    pub point: HookPoint,
    pub policy: ChainPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Filter,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    Prerouting,
    Input,
    Forward,
    Postrouting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainPolicy {
    Accept,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    /// Kept in the kernel with the rule, so `nft list` explains itself.
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, verdict: Verdict) -> Self {
        Rule {
            matches,
            verdict,
            comment: None,
        }
    }

    pub fn commented(mut self, comment: &str) -> Self {
        self.comment = Some(comment.to_string());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Interface name; a trailing `*` matches by prefix.
    Iifname(String),
    Oifname {
        not: bool,
        name: String,
    },
    /// `meta nfproto ipv6`: the packet is IPv6.
    Ipv6,
    /// `meta l4proto tcp`.
    Tcp,
    Saddr {
        not: bool,
        set: AddrSet,
    },
    Daddr {
        not: bool,
        set: AddrSet,
    },
    /// `ct state` is any of these.
    CtState(Vec<CtState>),
    /// The connection was destination-NAT-ed (here: opened by the host
    /// towards the slot address).
    CtStatusDnat,
}

/// In nft's print order (its bit order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CtState {
    Invalid,
    Established,
    Related,
    New,
}

impl CtState {
    fn as_str(self) -> &'static str {
        match self {
            CtState::Invalid => "invalid",
            CtState::Established => "established",
            CtState::Related => "related",
            CtState::New => "new",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
    Goto(String),
    Dnat(Ipv4Addr),
    Snat(Ipv4Addr),
    Masquerade,
    RejectTcpReset,
    /// ICMP (or ICMPv6) "administratively prohibited".
    RejectAdminProhibited,
}

impl Table {
    /// The table's definition, as `nft list table` prints it.
    pub fn render(&self) -> String {
        let mut out = format!("table {} {} {{\n", self.family.as_str(), self.name);
        for (i, chain) in self.chains.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            chain.render(self.family, &mut out);
        }
        out.push_str("}\n");
        out
    }

    /// An `nft -f` script that replaces this table in one transaction: the
    /// kernel switches from the old rules to the new ones with no moment in
    /// between, and creates the table if it did not exist.
    pub fn replace_script(&self) -> String {
        format!("{}{}", self.delete_script(), self.render())
    }

    /// An `nft -f` script that removes this table whether or not it exists.
    pub fn delete_script(&self) -> String {
        delete_table_script(self.family, &self.name)
    }
}

/// Declaring the empty table first makes the delete succeed when the table
/// is absent; both happen in one transaction.
pub(crate) fn delete_table_script(family: Family, name: &str) -> String {
    let family = family.as_str();
    format!("table {family} {name} {{}}\ndelete table {family} {name}\n")
}

impl Chain {
    fn render(&self, family: Family, out: &mut String) {
        let _ = writeln!(out, "\tchain {} {{", self.name);
        if let Some(hook) = &self.hook {
            let _ = writeln!(out, "\t\t{hook}");
        }
        for rule in &self.rules {
            let _ = writeln!(out, "\t\t{}", RuleText { rule, family });
        }
        out.push_str("\t}\n");
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, priority) = match (self.kind, self.point) {
            (ChainKind::Nat, HookPoint::Prerouting) => ("nat", "dstnat"),
            (ChainKind::Nat, _) => ("nat", "srcnat"),
            (ChainKind::Filter, _) => ("filter", "filter"),
        };
        let point = match self.point {
            HookPoint::Prerouting => "prerouting",
            HookPoint::Input => "input",
            HookPoint::Forward => "forward",
            HookPoint::Postrouting => "postrouting",
        };
        let policy = match self.policy {
            ChainPolicy::Accept => "accept",
            ChainPolicy::Drop => "drop",
        };
        write!(
            f,
            "type {kind} hook {point} priority {priority}; policy {policy};"
        )
    }
}

struct RuleText<'a> {
    rule: &'a Rule,
    family: Family,
}

impl fmt::Display for RuleText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = |not: bool| if not { "!= " } else { "" };
        for m in &self.rule.matches {
            match m {
                Match::Iifname(name) => write!(f, "iifname \"{name}\" ")?,
                Match::Oifname { not, name } => write!(f, "oifname {}\"{name}\" ", neg(*not))?,
                Match::Ipv6 => f.write_str("meta nfproto ipv6 ")?,
                Match::Tcp => f.write_str("meta l4proto tcp ")?,
                Match::Saddr { not, set } => write!(f, "ip saddr {}{set} ", neg(*not))?,
                Match::Daddr { not, set } => write!(f, "ip daddr {}{set} ", neg(*not))?,
                Match::CtState(states) => {
                    let mut states = states.clone();
                    states.sort();
                    states.dedup();
                    let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
                    write!(f, "ct state {} ", names.join(","))?;
                }
                Match::CtStatusDnat => f.write_str("ct status dnat ")?,
            }
        }
        // An inet table must say which family a NAT address belongs to.
        let nat_family = match self.family {
            Family::Inet => "ip ",
            Family::Ip => "",
        };
        match &self.rule.verdict {
            Verdict::Accept => f.write_str("accept")?,
            Verdict::Drop => f.write_str("drop")?,
            Verdict::Jump(chain) => write!(f, "jump {chain}")?,
            Verdict::Goto(chain) => write!(f, "goto {chain}")?,
            Verdict::Dnat(addr) => write!(f, "dnat {nat_family}to {addr}")?,
            Verdict::Snat(addr) => write!(f, "snat {nat_family}to {addr}")?,
            Verdict::Masquerade => f.write_str("masquerade")?,
            Verdict::RejectTcpReset => f.write_str("reject with tcp reset")?,
            Verdict::RejectAdminProhibited => f.write_str("reject with icmpx admin-prohibited")?,
        }
        if let Some(comment) = &self.rule.comment {
            // Comments are ours, never user input; keep them quote-free anyway.
            write!(f, " comment \"{}\"", comment.replace('"', "'"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::Ipv4Cidr;

    #[test]
    fn renders_like_nft_list_and_replaces_atomically() {
        let table = Table {
            family: Family::Inet,
            name: "t".into(),
            chains: vec![
                Chain {
                    name: "pre".into(),
                    hook: Some(Hook {
                        kind: ChainKind::Nat,
                        point: HookPoint::Prerouting,
                        policy: ChainPolicy::Accept,
                    }),
                    rules: vec![
                        Rule::new(
                            vec![
                                Match::Iifname("veth0".into()),
                                Match::Daddr {
                                    not: false,
                                    set: AddrSet::new([Ipv4Cidr::host(Ipv4Addr::new(10, 0, 0, 2))]),
                                },
                            ],
                            Verdict::Dnat(Ipv4Addr::new(169, 254, 0, 21)),
                        )
                        .commented("say \"hi\""),
                    ],
                },
                Chain {
                    name: "plain".into(),
                    hook: None,
                    rules: vec![
                        Rule::new(
                            vec![Match::CtState(vec![CtState::Related, CtState::Established])],
                            Verdict::Accept,
                        ),
                        Rule::new(vec![], Verdict::Drop),
                    ],
                },
            ],
        };
        assert_eq!(
            table.render(),
            "table inet t {\n\
             \tchain pre {\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"veth0\" ip daddr 10.0.0.2 dnat ip to 169.254.0.21 comment \"say 'hi'\"\n\
             \t}\n\
             \n\
             \tchain plain {\n\
             \t\tct state established,related accept\n\
             \t\tdrop\n\
             \t}\n\
             }\n"
        );
        assert!(
            table
                .replace_script()
                .starts_with("table inet t {}\ndelete table inet t\ntable inet t {\n")
        );
    }
}
