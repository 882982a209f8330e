package main

import (
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// chart draws two grouped bar charts, one over the other: TCP throughput
// (both directions, 1 stream) and short connections per second (1 and 16
// clients), one group of bars per contender that has figures.
func (r *results) chart(path string, sums map[string]map[string]summary) error {
	var names []string
	for _, n := range r.order {
		if _, ok := sums[n]["tcp_h2c_1"]; ok {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return fmt.Errorf("no contender has figures to draw")
	}
	width := vg.Length(120+70*len(names)) * vg.Millimeter / 4
	if width < 16*vg.Centimeter {
		width = 16 * vg.Centimeter
	}
	// Each contender's group takes 80% of its share of the x axis.
	group := (width - 2*vg.Centimeter) / vg.Length(len(names)) * 0.8
	tput, err := barPlot("TCP throughput through 127.0.0.1:P (median)", "Gbit/s", names, sums, group, []series{
		{"host→child, 1 stream", "tcp_h2c_1"}, {"child→host, 1 stream", "tcp_c2h_1"},
		{"host→child, 4 streams", "tcp_h2c_4"}, {"child→host, 4 streams", "tcp_c2h_4"},
	})
	if err != nil {
		return err
	}
	conns, err := barPlot("Short connections (connect, 32 B request, 32 B reply, close)", "connections/s", names, sums, group, []series{
		{"1 client", "conn_1"}, {"16 clients", "conn_16"},
	})
	if err != nil {
		return err
	}
	img := vgimg.New(width, 20*vg.Centimeter)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 2, Cols: 1, PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2,
		PadX: vg.Millimeter * 2, PadY: vg.Millimeter * 4}
	canvases := plot.Align([][]*plot.Plot{{tput}, {conns}}, tiles, dc)
	tput.Draw(canvases[0][0])
	conns.Draw(canvases[1][0])
	return saveImage(img, path)
}

type series struct{ label, key string }

var palette = []color.Color{
	color.RGBA{0x1f, 0x77, 0xb4, 0xff}, color.RGBA{0xff, 0x7f, 0x0e, 0xff},
	color.RGBA{0x2c, 0xa0, 0x2c, 0xff}, color.RGBA{0xd6, 0x27, 0x28, 0xff},
}

func barPlot(title, unit string, names []string, sums map[string]map[string]summary, group vg.Length, ss []series) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = unit
	p.Y.Min = 0
	p.Legend.Top = true
	width := group / vg.Length(len(ss))
	top := 0.0
	for _, s := range ss {
		for _, n := range names {
			top = max(top, sums[n][s.key].Median)
		}
	}
	p.Y.Max = top * 1.4 // room for the legend above the bars
	for i, s := range ss {
		vals := make(plotter.Values, len(names))
		for j, n := range names {
			vals[j] = sums[n][s.key].Median
		}
		bars, err := plotter.NewBarChart(vals, width)
		if err != nil {
			return nil, err
		}
		bars.Color = palette[i%len(palette)]
		bars.LineStyle.Width = 0
		bars.Offset = width * vg.Length(float64(i)-float64(len(ss)-1)/2)
		p.Add(bars)
		p.Legend.Add(s.label, bars)
	}
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.35
	p.X.Tick.Label.XAlign = draw.XRight
	return p, nil
}

func saveImage(img *vgimg.Canvas, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
