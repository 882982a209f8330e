package builtin

// A measurement of the builtin driver against direct loopback, with every
// party in its own process as in production: the forwarder runs as the
// unprivileged user with the helper source; iperf3 and the request/reply
// server run inside the child netns. It is heavy, so it runs only when asked:
//
//	PORTKIT_MEASURE=1 go test -run TestMeasurePerformance -v -timeout 10m ./libport/builtin
//
// `make bench` (integration/bench) is the full comparison with the peers.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

func TestMeasurePerformance(t *testing.T) {
	if os.Getenv("PORTKIT_MEASURE") == "" {
		t.Skip("set PORTKIT_MEASURE=1 to measure throughput and connection rate (takes about 2 minutes of both cores)")
	}
	testenv.RequireRoot(t)
	iperf := testenv.RequireBinary(t, "iperf3")
	u := testenv.Unprivileged(t)
	n := testenv.ChildNetns(t, u)
	peer := testenv.NewPeer(t)
	bin := userBinary(t, u)
	reps := 3
	if s := os.Getenv("PORTKIT_MEASURE_REPS"); s != "" {
		reps, _ = strconv.Atoi(s)
	}

	// Servers: a request/reply server in the child and one on the host.
	rrChild := startRRServer(t, n.Command(u, bin, "tcp4", "127.0.0.1:0"))
	rrHost := startRRServer(t, u.Cmd(bin, "tcp4", "127.0.0.1:0"))
	iperfChild := freePort(t, "tcp4")
	iperfHost := freePort(t, "tcp4")
	testenv.Start(t, n.Command(u, iperf, "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(iperfChild)))
	testenv.Start(t, u.Cmd(iperf, "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(iperfHost)))

	// Two forwarders: source IP on (the default) and off, for peer clients.
	pRR, pIperf := freePort(t, "tcp4"), freePort(t, "tcp4")
	line, ok, fwd := forwarderPID(t, u, bin, n.Path, "helper", "tcp",
		fmt.Sprintf("%d:%d/tcp4", pRR, rrChild), fmt.Sprintf("%d:%d/tcp4", pIperf, iperfChild))
	if !ok {
		t.Fatalf("forwarder: %s", line)
	}
	// The forwarder's CPU time (its helper is idle once sockets are pooled)
	// is steadier than rates on a shared machine.
	cpu := func() time.Duration {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", fwd))
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ is 100
	}
	pRROff := freePort(t, "tcp4")
	if line, ok := forwarder(t, u, bin, n.Path, "helper", "none", fmt.Sprintf("%d:%d/tcp4", pRROff, rrChild)); !ok {
		t.Fatalf("forwarder: %s", line)
	}
	time.Sleep(300 * time.Millisecond) // let iperf3 servers come up
	if hold, _ := time.ParseDuration(os.Getenv("PORTKIT_MEASURE_HOLD")); hold > 0 {
		// For profiling by hand: the set-up stays up for hold.
		t.Logf("holding %v: iperf3 direct 127.0.0.1:%d, builtin 127.0.0.1:%d; rr direct 127.0.0.1:%d, builtin 127.0.0.1:%d",
			hold, iperfHost, pIperf, rrHost, pRR)
		time.Sleep(hold)
		return
	}

	iperfRun := func(port int, reverse bool) float64 {
		args := []string{"-c", "127.0.0.1", "-p", strconv.Itoa(port), "-t", "3", "-O", "1", "-J"}
		if reverse {
			args = append(args, "-R")
		}
		out, err := u.Cmd(iperf, args...).Output()
		if err != nil {
			t.Fatalf("iperf3 %v: %v: %s", args, err, out)
		}
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("iperf3 output: %v", err)
		}
		return r.End.SumReceived.BitsPerSecond / 1e9
	}
	rrRun := func(cmd *exec.Cmd) rrResult {
		cmd.Env = append(cmd.Env, roleEnv+"=rr-client")
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("rr client %v: %v: %s %s", cmd.Args, err, out, stderr.String())
		}
		var r rrResult
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("rr client output %q: %v", out, err)
		}
		if r.Errors > 0 {
			t.Logf("rr client: %d failed connections", r.Errors)
		}
		return r
	}
	// inPeer runs bin inside the peer; nil when the peer cannot be entered
	// (test hosts are shared machine-wide and have been seen to vanish).
	inPeer := func(args ...string) *exec.Cmd {
		if out, err := exec.Command("nsenter", "--net="+peer.Path, "true").CombinedOutput(); err != nil {
			t.Logf("skipping the peer measurement: nsenter into %s: %v: %s", peer.Path, err, out)
			return nil
		}
		return exec.Command("nsenter", append([]string{"--net=" + peer.Path, bin}, args...)...)
	}

	type series struct {
		name string
		vals []float64
	}
	var table []series
	add := func(name string, v float64) {
		for i := range table {
			if table[i].name == name {
				table[i].vals = append(table[i].vals, v)
				return
			}
		}
		table = append(table, series{name, []float64{v}})
	}
	for r := 0; r < reps; r++ {
		for _, rev := range []bool{false, true} {
			dir := "host→child"
			if rev {
				dir = "child→host"
			}
			add("throughput "+dir+" Gbit/s direct", iperfRun(iperfHost, rev))
			c0 := cpu()
			gbps := iperfRun(pIperf, rev)
			add("throughput "+dir+" Gbit/s builtin", gbps)
			add("forwarder CPU s per GB "+dir, (cpu()-c0).Seconds()/(gbps*4/8)) // 3 s measured + 1 s omitted
		}
		for _, clients := range []string{"1", "16"} {
			d := rrRun(u.Cmd(bin, hostPort("127.0.0.1", rrHost), "3s", clients))
			c0 := cpu()
			b := rrRun(u.Cmd(bin, hostPort("127.0.0.1", pRR), "3s", clients))
			add("forwarder CPU µs per conn, "+clients+" client(s)", float64((cpu()-c0).Microseconds())/float64(b.Conns))
			add("conn/s "+clients+" client(s) direct", float64(d.Conns)/d.Seconds)
			add("conn/s "+clients+" client(s) builtin", float64(b.Conns)/b.Seconds)
			add("p99 µs "+clients+" client(s) direct", d.P99us)
			add("p99 µs "+clients+" client(s) builtin", b.P99us)
		}
		if cmdOn, cmdOff := inPeer(hostPort(peer.LocalIP4.String(), pRR), "3s", "1"), inPeer(hostPort(peer.LocalIP4.String(), pRROff), "3s", "1"); cmdOn != nil && cmdOff != nil {
			on, off := rrRun(cmdOn), rrRun(cmdOff)
			add("conn/s from a peer, source IP on", float64(on.Conns)/on.Seconds)
			add("conn/s from a peer, source IP off", float64(off.Conns)/off.Seconds)
		}
	}
	median := func(v []float64) float64 {
		s := slices.Clone(v)
		slices.Sort(s)
		return s[len(s)/2]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n%-44s %12s %12s %12s\n", "measurement (median of runs)", "median", "min", "max")
	for _, s := range table {
		fmt.Fprintf(&b, "%-44s %12.2f %12.2f %12.2f\n", s.name, median(s.vals), slices.Min(s.vals), slices.Max(s.vals))
	}
	ratio := func(what string) float64 {
		var d, x float64
		for _, s := range table {
			switch s.name {
			case what + " direct":
				d = median(s.vals)
			case what + " builtin":
				x = median(s.vals)
			}
		}
		return x / d
	}
	for _, what := range []string{"throughput host→child Gbit/s", "throughput child→host Gbit/s", "conn/s 1 client(s)", "conn/s 16 client(s)", "p99 µs 1 client(s)", "p99 µs 16 client(s)"} {
		fmt.Fprintf(&b, "ratio builtin/direct %-30s %6.2f\n", what, ratio(what))
	}
	var on, off float64
	for _, s := range table {
		switch s.name {
		case "conn/s from a peer, source IP on":
			on = median(s.vals)
		case "conn/s from a peer, source IP off":
			off = median(s.vals)
		}
	}
	fmt.Fprintf(&b, "ratio source IP on/off (peer conn/s)              %6.2f\n", on/off)
	t.Log(b.String())
}

// startRRServer starts cmd in the rr-server role and returns its port.
func startRRServer(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	cmd.Env = append(cmd.Env, roleEnv+"=rr-server")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	testenv.Start(t, cmd)
	t.Cleanup(func() { stdin.Close() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("rr server: %v", err)
	}
	port, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("rr server said %q", line)
	}
	return port
}
