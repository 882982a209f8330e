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
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
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
	udpChild := startRRServer(t, n.Command(u, bin, "udp4", "127.0.0.1:0"))
	udpHost := startRRServer(t, u.Cmd(bin, "udp4", "127.0.0.1:0"))
	iperfChild := freePort(t, "tcp4")
	iperfHost := freePort(t, "tcp4")
	testenv.Start(t, n.Command(u, iperf, "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(iperfChild)))
	testenv.Start(t, u.Cmd(iperf, "-s", "-B", "127.0.0.1", "-p", strconv.Itoa(iperfHost)))

	// Two forwarders: source IP on (the default) and off, for peer clients.
	pRR, pIperf := freePort(t, "tcp4"), freePort(t, "tcp4")
	pUDPRR := freePort(t, "udp4")
	line, ok, fwd := forwarderPID(t, u, bin, n.Path, "helper", "tcp",
		fmt.Sprintf("%d:%d/tcp4", pRR, rrChild), fmt.Sprintf("%d:%d/tcp4", pIperf, iperfChild), fmt.Sprintf("%d:%d/udp4", pIperf, iperfChild),
		fmt.Sprintf("%d:%d/udp4", pUDPRR, udpChild))
	if !ok {
		t.Fatalf("forwarder: %s", line)
	}
	// A second build of the forwarder (PORTKIT_MEASURE_BASE names a test
	// binary of this package built from other code) measured in the same
	// run, alternating with this one: the only fair A/B on a shared machine.
	type contender struct {
		name      string
		pid       int
		rr, iperf int
		udpRR     int
	}
	contenders := []contender{{"builtin", fwd, pRR, pIperf, pUDPRR}}
	if base := os.Getenv("PORTKIT_MEASURE_BASE"); base != "" {
		bbin := copyForUser(t, u, base, "base.test")
		bRR, bIperf, bUDPRR := freePort(t, "tcp4"), freePort(t, "tcp4"), freePort(t, "udp4")
		line, ok, bfwd := forwarderPID(t, u, bbin, n.Path, "helper", "tcp",
			fmt.Sprintf("%d:%d/tcp4", bRR, rrChild), fmt.Sprintf("%d:%d/tcp4", bIperf, iperfChild), fmt.Sprintf("%d:%d/udp4", bIperf, iperfChild),
			fmt.Sprintf("%d:%d/udp4", bUDPRR, udpChild))
		if !ok {
			t.Fatalf("base forwarder: %s", line)
		}
		contenders = append(contenders, contender{"base", bfwd, bRR, bIperf, bUDPRR})
	}
	// The forwarder's CPU time (its helper is idle once sockets are pooled)
	// is steadier than rates on a shared machine.
	cpu := func(pid int) time.Duration {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
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
	// PORTKIT_MEASURE_ONLY=throughput|udp|conn|peer|memory limits the run to one part.
	only := os.Getenv("PORTKIT_MEASURE_ONLY")
	part := func(name string) bool { return only == "" || only == name }

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
	// udpRun offers 2 Gbit/s of 1400-byte datagrams and returns what the
	// server received, in Gbit/s.
	udpRun := func(port int) float64 {
		args := []string{"-c", "127.0.0.1", "-p", strconv.Itoa(port), "-u", "-b", "2G", "-l", "1400", "-t", "3", "-J"}
		out, err := u.Cmd(iperf, args...).Output()
		if err != nil {
			t.Fatalf("iperf3 %v: %v: %s", args, err, out)
		}
		var r struct {
			End struct {
				Sum struct {
					BitsPerSecond float64 `json:"bits_per_second"`
					LostPercent   float64 `json:"lost_percent"`
				} `json:"sum"`
			} `json:"end"`
		}
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("iperf3 output: %v", err)
		}
		return r.End.Sum.BitsPerSecond * (1 - r.End.Sum.LostPercent/100) / 1e9
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
	for _, c := range contenders {
		add("forwarder+helper RSS MiB idle "+c.name, float64(treeRSS(t, c.pid))/1024)
		add("forwarder+helper PSS MiB idle "+c.name, float64(treePSS(t, c.pid))/1024)
	}
	for r := 0; r < reps; r++ {
		if part("throughput") {
			for _, rev := range []bool{false, true} {
				dir := "host→child"
				if rev {
					dir = "child→host"
				}
				add("throughput "+dir+" Gbit/s direct", iperfRun(iperfHost, rev))
				for _, c := range contenders {
					c0 := cpu(c.pid)
					gbps := iperfRun(c.iperf, rev)
					add("throughput "+dir+" Gbit/s "+c.name, gbps)
					add("forwarder CPU s per GB "+dir+" "+c.name, (cpu(c.pid)-c0).Seconds()/(gbps*4/8)) // 3 s measured + 1 s omitted
				}
			}
		}
		if part("udp") {
			add("UDP received at 2 Gbit/s offered, Gbit/s direct", udpRun(iperfHost))
			for _, c := range contenders {
				c0 := cpu(c.pid)
				gbps := udpRun(c.iperf)
				add("UDP received at 2 Gbit/s offered, Gbit/s "+c.name, gbps)
				add("forwarder CPU s per GB UDP "+c.name, (cpu(c.pid)-c0).Seconds()/(gbps*3/8))
			}
			// Request/reply latency: one client, one 64-byte datagram at a time.
			d := rrRun(u.Cmd(bin, "udp:"+hostPort("127.0.0.1", udpHost), "2s", "1"))
			add("UDP rr p50 µs direct", d.P50us)
			add("UDP rr p99 µs direct", d.P99us)
			for _, c := range contenders {
				c0 := cpu(c.pid)
				b := rrRun(u.Cmd(bin, "udp:"+hostPort("127.0.0.1", c.udpRR), "2s", "1"))
				add("forwarder CPU µs per UDP rr "+c.name, float64((cpu(c.pid)-c0).Microseconds())/float64(b.Conns))
				add("UDP rr p50 µs "+c.name, b.P50us)
				add("UDP rr p99 µs "+c.name, b.P99us)
			}
		}
		if part("conn") {
			for _, clients := range []string{"1", "16"} {
				d := rrRun(u.Cmd(bin, hostPort("127.0.0.1", rrHost), "3s", clients))
				add("conn/s "+clients+" client(s) direct", float64(d.Conns)/d.Seconds)
				add("p99 µs "+clients+" client(s) direct", d.P99us)
				for _, c := range contenders {
					c0 := cpu(c.pid)
					b := rrRun(u.Cmd(bin, hostPort("127.0.0.1", c.rr), "3s", clients))
					add("forwarder CPU µs per conn, "+clients+" client(s) "+c.name, float64((cpu(c.pid)-c0).Microseconds())/float64(b.Conns))
					add("conn/s "+clients+" client(s) "+c.name, float64(b.Conns)/b.Seconds)
					add("p99 µs "+clients+" client(s) "+c.name, b.P99us)
				}
			}
		}
		if !part("peer") {
			continue
		}
		if cmdOn, cmdOff := inPeer(hostPort(peer.LocalIP4.String(), pRR), "3s", "1"), inPeer(hostPort(peer.LocalIP4.String(), pRROff), "3s", "1"); cmdOn != nil && cmdOff != nil {
			on, off := rrRun(cmdOn), rrRun(cmdOff)
			add("conn/s from a peer, source IP on", float64(on.Conns)/on.Seconds)
			add("conn/s from a peer, source IP off", float64(off.Conns)/off.Seconds)
		}
	}
	for _, c := range contenders {
		add("forwarder+helper RSS MiB after "+c.name, float64(treeRSS(t, c.pid))/1024)
		add("forwarder+helper PSS MiB after "+c.name, float64(treePSS(t, c.pid))/1024)
	}
	// Memory per idle connection: 1000 connections that send nothing (the
	// request/reply server waits for their request).
	if part("conn") || part("memory") {
		for _, c := range contenders {
			before := treeRSS(t, c.pid)
			var idle []net.Conn
			for range 1000 {
				conn, err := net.Dial("tcp4", hostPort("127.0.0.1", c.rr))
				if err != nil {
					t.Fatalf("idle connection %d: %v", len(idle), err)
				}
				idle = append(idle, conn)
			}
			time.Sleep(500 * time.Millisecond)
			after := treeRSS(t, c.pid)
			add("forwarder+helper RSS KiB per idle conn "+c.name, float64(after-before)/1000)
			for _, conn := range idle {
				conn.Close()
			}
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
	ratio := func(what, name string) float64 {
		var d, x float64
		for _, s := range table {
			switch s.name {
			case what + " direct":
				d = median(s.vals)
			case what + " " + name:
				x = median(s.vals)
			}
		}
		return x / d
	}
	for _, c := range contenders {
		for _, what := range []string{"throughput host→child Gbit/s", "throughput child→host Gbit/s", "conn/s 1 client(s)", "conn/s 16 client(s)", "p99 µs 1 client(s)", "p99 µs 16 client(s)", "UDP received at 2 Gbit/s offered, Gbit/s", "UDP rr p50 µs", "UDP rr p99 µs"} {
			fmt.Fprintf(&b, "ratio %s/direct %-30s %6.2f\n", c.name, what, ratio(what, c.name))
		}
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

// copyForUser copies the executable at path where u can run it.
func copyForUser(t *testing.T, u *testenv.User, path, name string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := u.Dir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, name)
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// treeRSS is the resident memory in KiB of pid and its descendants (the
// forwarder and its netns helper).
func treeRSS(t *testing.T, pid int) int { return treeKiB(t, pid, "status", "VmRSS:") }

// treePSS is the proportional set size in KiB of pid and its descendants:
// pages shared between them (the binary's text, which the helper re-executes)
// count once, not once per process as in treeRSS.
func treePSS(t *testing.T, pid int) int { return treeKiB(t, pid, "smaps_rollup", "Pss:") }

// treeKiB sums the "field N kB" line of /proc/PID/file over pid and its
// descendants.
func treeKiB(t *testing.T, pid int, file, field string) int {
	t.Helper()
	total := 0
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, file))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field); ok {
			kb, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			total += kb
		}
	}
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		for _, k := range strings.Fields(string(kids)) {
			if kp, err := strconv.Atoi(k); err == nil {
				total += treeKiB(t, kp, file, field)
			}
		}
	}
	return total
}

// TestMeasureAddLatency times Add of a TCP and a UDP port (the target is
// 5 ms for add-ports to return).
func TestMeasureAddLatency(t *testing.T) {
	if os.Getenv("PORTKIT_MEASURE") == "" {
		t.Skip("set PORTKIT_MEASURE=1 to measure")
	}
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, echo)
	for _, proto := range []string{"tcp4", "udp4"} {
		var times []time.Duration
		for range 20 {
			spec := libport.Spec{Proto: proto, ParentPort: freePort(t, proto), ChildPort: childPort(l.Addr())}
			start := time.Now()
			_, id := publish(t, d, spec)
			times = append(times, time.Since(start))
			if err := d.Remove(context.Background(), id); err != nil {
				t.Fatal(err)
			}
		}
		slices.Sort(times)
		t.Logf("Add %s: median %v, max %v (20 ports)", proto, times[len(times)/2], times[len(times)-1])
	}
}
