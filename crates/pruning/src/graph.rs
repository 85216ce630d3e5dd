//! Coupled channel groups, found by union-find over channels.
//!
//! A network is described by its *channel spaces* (the channel dimension of every feature
//! map: a conv's output, a block's residual stream, ...), the parameter axes that index each
//! space (producers: conv filters, conv bias and BatchNorm vectors along axis 0; consumers:
//! the input axis of the next conv or linear layer), and *links* between spaces: a residual
//! add says that channel `i` of one space is channel `i` of another; the zero-padded
//! option-A shortcut says that channel `i` of the block input is channel `i + pad` of the
//! block output.
//!
//! Union-find over individual channels then gives the *units* that must be removed together
//! (one channel of every space it touches), and units that touch the same set of spaces form
//! a [`ChannelGroup`]: the channels of a residual stream with all its producers (the stem,
//! every block's last BN, projection shortcuts) and consumers, or the inner channels of one
//! block. This is the dependency graph that Torch-Pruning builds from a traced graph, built
//! here from the backbone's own structure description (see [`crate::arch`]).

use std::collections::BTreeMap;

/// Producer or consumer of a channel space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    /// Computes the channels (conv filters, conv bias, BatchNorm vectors).
    Producer,
    /// Reads the channels (input axis of the next conv or linear layer).
    Consumer,
}

/// One axis of one parameter that indexes the channels of a space.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Full VarStore name of the parameter or buffer (`layer1.0.conv1.weight`).
    pub param: String,
    /// The axis that indexes channels.
    pub axis: usize,
    /// Contiguous elements per channel along `axis` (1 for convs and BN; `h * w` for a linear
    /// layer reading a flattened `C x h x w` map).
    pub per_channel: usize,
    pub role: Role,
    /// Whether zeroing this member's slice silences the channel (conv filters, conv bias, BN
    /// weight and bias; not BN running statistics).
    pub masks: bool,
    /// Index of the space this member indexes.
    pub space: usize,
}

/// A channel dimension of the network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    pub name: String,
    pub size: usize,
    /// Spaces that may not lose channels (the input image, the logits).
    pub fixed: bool,
}

/// Records spaces, members and links; [`GraphBuilder::build`] finds the coupled groups.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    spaces: Vec<Space>,
    members: Vec<Member>,
    /// `(a, b, offset)`: channel `i` of `a` is channel `i + offset` of `b`.
    links: Vec<(usize, usize, usize)>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new channel space.
    pub fn space(&mut self, name: impl Into<String>, size: usize) -> usize {
        self.spaces.push(Space {
            name: name.into(),
            size,
            fixed: false,
        });
        self.spaces.len() - 1
    }

    /// A space whose channels are never removed (network input, logits).
    pub fn fixed_space(&mut self, name: impl Into<String>, size: usize) -> usize {
        let s = self.space(name, size);
        self.spaces[s].fixed = true;
        s
    }

    pub fn size(&self, space: usize) -> usize {
        self.spaces[space].size
    }

    fn member(&mut self, param: String, axis: usize, per_channel: usize, role: Role, masks: bool, space: usize) {
        self.members.push(Member {
            param,
            axis,
            per_channel,
            role,
            masks,
            space,
        });
    }

    /// A dense convolution `prefix` (`prefix.weight` is `[out, in, kh, kw]`, optional
    /// `prefix.bias`) from space `input` to space `output`.
    pub fn conv(&mut self, prefix: &str, input: usize, output: usize, bias: bool) {
        self.member(format!("{prefix}.weight"), 1, 1, Role::Consumer, false, input);
        self.member(format!("{prefix}.weight"), 0, 1, Role::Producer, true, output);
        if bias {
            self.member(format!("{prefix}.bias"), 0, 1, Role::Producer, true, output);
        }
    }

    /// A BatchNorm `prefix` over `space` (weight, bias, running statistics).
    pub fn batch_norm(&mut self, prefix: &str, space: usize) {
        for (leaf, masks) in [("weight", true), ("bias", true), ("running_mean", false), ("running_var", false)] {
            self.member(format!("{prefix}.{leaf}"), 0, 1, Role::Producer, masks, space);
        }
    }

    /// A linear layer `prefix` reading `space` (flattened with `per_channel` positions per
    /// channel) into the fixed space `output`.
    pub fn linear(&mut self, prefix: &str, input: usize, per_channel: usize, output: usize, bias: bool) {
        self.member(format!("{prefix}.weight"), 1, per_channel, Role::Consumer, false, input);
        self.member(format!("{prefix}.weight"), 0, 1, Role::Producer, false, output);
        if bias {
            self.member(format!("{prefix}.bias"), 0, 1, Role::Producer, false, output);
        }
    }

    /// Channel `i` of `a` is channel `i` of `b` (a residual add, an identity shortcut).
    pub fn same(&mut self, a: usize, b: usize) {
        assert_eq!(
            self.spaces[a].size, self.spaces[b].size,
            "identity link between spaces of different sizes"
        );
        self.links.push((a, b, 0));
    }

    /// Channel `i` of `a` is channel `i + offset` of `b` (option-A zero-padded shortcut).
    pub fn offset(&mut self, a: usize, b: usize, offset: usize) {
        assert!(offset + self.spaces[a].size <= self.spaces[b].size, "offset link out of range");
        self.links.push((a, b, offset));
    }

    /// Union-find over channels; units touching the same spaces form one group.
    pub fn build(self) -> ChannelGraph {
        let mut base = Vec::with_capacity(self.spaces.len());
        let mut n = 0;
        for s in &self.spaces {
            base.push(n);
            n += s.size;
        }
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        for &(a, b, off) in &self.links {
            for i in 0..self.spaces[a].size {
                let (ra, rb) = (find(&mut parent, base[a] + i), find(&mut parent, base[b] + i + off));
                if ra != rb {
                    parent[ra.max(rb)] = ra.min(rb);
                }
            }
        }
        // component root -> [(space, channel)]
        let mut comps: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for (s, sp) in self.spaces.iter().enumerate() {
            for c in 0..sp.size {
                let r = find(&mut parent, base[s] + c);
                comps.entry(r).or_default().push((s, c));
            }
        }
        // signature (sorted spaces) -> units (channel per space, in signature order)
        let mut groups: BTreeMap<Vec<usize>, Vec<Vec<usize>>> = BTreeMap::new();
        for (_, mut nodes) in comps {
            nodes.sort();
            let spaces: Vec<usize> = nodes.iter().map(|n| n.0).collect();
            let mut dedup = spaces.clone();
            dedup.dedup();
            assert_eq!(
                dedup.len(),
                spaces.len(),
                "a channel unit holds two channels of one space (inconsistent links)"
            );
            groups.entry(spaces).or_default().push(nodes.iter().map(|n| n.1).collect());
        }
        let mut out: Vec<ChannelGroup> = groups
            .into_iter()
            .map(|(spaces, units)| {
                let fixed = spaces.iter().any(|&s| self.spaces[s].fixed);
                let has_producer = self.members.iter().any(|m| m.role == Role::Producer && spaces.contains(&m.space));
                let blocked = if fixed {
                    Some("holds a fixed space (network input or logits)".to_string())
                } else if !has_producer {
                    Some("no producer".to_string())
                } else {
                    None
                };
                ChannelGroup {
                    id: 0,
                    name: self.spaces[spaces[0]].name.clone(),
                    spaces,
                    units,
                    blocked,
                }
            })
            .collect();
        // a stable, readable order: by the first channel's position in the network
        out.sort_by_key(|g| (g.spaces[0], g.units[0][0]));
        for (i, g) in out.iter_mut().enumerate() {
            g.id = i;
        }
        ChannelGraph {
            spaces: self.spaces,
            members: self.members,
            groups: out,
        }
    }
}

/// Channels that are removed together.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChannelGroup {
    pub id: usize,
    /// Name of the group's first space.
    pub name: String,
    /// The spaces every unit touches (sorted).
    pub spaces: Vec<usize>,
    /// Each unit: its channel in each of `spaces` (same order).
    pub units: Vec<Vec<usize>>,
    /// Why the group can't be pruned, if it can't (set by the graph or by the architecture).
    pub blocked: Option<String>,
}

impl ChannelGroup {
    pub fn len(&self) -> usize {
        self.units.len()
    }
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
    pub fn prunable(&self) -> bool {
        self.blocked.is_none()
    }
}

/// Spaces, parameter members and the coupled groups of one network.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelGraph {
    pub spaces: Vec<Space>,
    pub members: Vec<Member>,
    pub groups: Vec<ChannelGroup>,
}

impl ChannelGraph {
    /// The space named `name`.
    pub fn space_id(&self, name: &str) -> Option<usize> {
        self.spaces.iter().position(|s| s.name == name)
    }

    /// Members (parameter axes) touching any space of `group`.
    pub fn group_members(&self, group: &ChannelGroup) -> Vec<&Member> {
        self.members.iter().filter(|m| group.spaces.contains(&m.space)).collect()
    }

    /// The group holding space `name`.
    pub fn group_of(&self, name: &str) -> Option<&ChannelGroup> {
        let s = self.space_id(name)?;
        self.groups.iter().find(|g| g.spaces.contains(&s))
    }

    /// Prunable groups.
    pub fn prunable(&self) -> impl Iterator<Item = &ChannelGroup> {
        self.groups.iter().filter(|g| g.prunable())
    }

    /// Marks group `id` as not prunable.
    pub fn block(&mut self, id: usize, why: impl Into<String>) {
        if self.groups[id].blocked.is_none() {
            self.groups[id].blocked = Some(why.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_adds_couple_channels_and_padding_offsets_them() {
        let mut b = GraphBuilder::new();
        let input = b.fixed_space("input", 3);
        let s1 = b.space("stream1", 4);
        let mid = b.space("mid", 5);
        let s2 = b.space("stream2", 8);
        b.conv("stem", input, s1, false);
        b.conv("c1", s1, mid, false);
        b.conv("c2", mid, s2, false);
        b.offset(s1, s2, 2);
        let g = b.build();
        // input | mid (5 units) | stream1 + stream2[2..6] (4 units) | stream2 padding (4 units)
        let group_of = |space: usize| g.groups.iter().find(|x| x.spaces.contains(&space)).unwrap();
        assert_eq!(group_of(mid).len(), 5);
        assert_eq!(group_of(s1).spaces, vec![s1, s2]);
        assert_eq!(group_of(s1).units, vec![vec![0, 2], vec![1, 3], vec![2, 4], vec![3, 5]]);
        let pad: Vec<_> = g.groups.iter().filter(|x| x.spaces == vec![s2]).collect();
        assert_eq!(pad.len(), 1);
        assert_eq!(pad[0].units.iter().map(|u| u[0]).collect::<Vec<_>>(), vec![0, 1, 6, 7]);
        assert!(group_of(input).blocked.is_some());
        assert_eq!(g.groups.len(), 4);
    }
}
