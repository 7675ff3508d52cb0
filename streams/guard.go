package streams

import (
	"context"
	"fmt"
	"strings"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/dimmer-dev/dimmer/flags"
)

// Guards for a topic's migration, for [flags.Controller] beside
// [flags.FleetGuard] (every consumer and producer instance applied the
// current stage). Each names what fails.

// MirrorCaughtUpGuard refuses entering live, rampdown or complete while the
// mirror of topic (its position in group mirrorGroup on the cluster it
// copies from, see [GroupStatus]) is more than maxLag records behind that
// cluster in any partition: consumers moving to new would wait for
// records, and at complete they would be lost.
func MirrorCaughtUpGuard(old, new *kadm.Client, topic, mirrorGroup string, maxLag int64) flags.Guard {
	return flags.NewGuard("stream-mirror-caught-up", flags.Entering(flags.Live, flags.RampDown, flags.Complete),
		func(ctx context.Context, _ flags.Transition) error {
			st, err := GroupStatus(ctx, old, new, topic, "", mirrorGroup)
			if err != nil {
				return err
			}
			var behind []string
			for _, p := range st.Partitions {
				if p.MirrorLag > maxLag {
					behind = append(behind, fmt.Sprintf("partition %d is %d records behind", p.Partition, p.MirrorLag))
				}
			}
			if len(behind) > 0 {
				return fmt.Errorf("mirror %q of %q over %d records behind: %s", mirrorGroup, topic, maxLag, strings.Join(behind, "; "))
			}
			return nil
		})
}

// RepairsGuard refuses entering live or complete while stream repairs are
// pending: new (or, after rampdown, old) still lacks records a consumer
// moving there would need.
func RepairsGuard(log RepairLog) flags.Guard {
	return flags.NewGuard("stream-no-pending-repairs", flags.Entering(flags.Live, flags.Complete),
		func(ctx context.Context, _ flags.Transition) error {
			n, err := log.Pending(ctx)
			if err != nil {
				return fmt.Errorf("repair log unreachable: %v", err)
			}
			if n > 0 {
				return fmt.Errorf("%d stream repairs pending", n)
			}
			return nil
		})
}

// ConsumerLagGuard refuses entering rampdown (producers move to new) unless
// group reads topic on new in every partition with at most maxLag records
// left there, and refuses entering complete while the group is still on
// old or any member is still in its group on old.
func ConsumerLagGuard(old, new *kadm.Client, topic, group string, maxLag int64) flags.Guard {
	return flags.NewGuard("stream-consumers-on-new", flags.Entering(flags.RampDown, flags.Complete),
		func(ctx context.Context, t flags.Transition) error {
			st, err := GroupStatus(ctx, old, new, topic, group, "")
			if err != nil {
				return err
			}
			var bad []string
			for _, p := range st.Partitions {
				switch {
				case p.GroupOn == flags.Old:
					bad = append(bad, fmt.Sprintf("partition %d is still consumed on old", p.Partition))
				case p.Lag > maxLag:
					bad = append(bad, fmt.Sprintf("partition %d lags %d records on new", p.Partition, p.Lag))
				}
			}
			if t.Entering(flags.Complete) {
				gs, err := old.DescribeGroups(ctx, group)
				if err != nil {
					return fmt.Errorf("describe group %q on old: %v", group, err)
				}
				if g, ok := gs[group]; ok && len(g.Members) > 0 {
					bad = append(bad, fmt.Sprintf("%d members still in the group on old", len(g.Members)))
				}
			}
			if len(bad) > 0 {
				return fmt.Errorf("group %q on %q (max lag %d): %s", group, topic, maxLag, strings.Join(bad, "; "))
			}
			return nil
		})
}
