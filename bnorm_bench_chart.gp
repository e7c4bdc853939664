set terminal png size 242,700
set output 'bnorm_bench.png'
set title 'fraction of the copy bound, float32, 2 threads (higher is better)'
set style data histograms
set style histogram clustered gap 1
set style fill solid
set yrange [0:1.1]
set xtics rotate by 90 right font ',7'
set grid y
set datafile missing '-1.0000'
plot 'bnorm_bench_chart.dat' using 2:xtic(1) title 'bnorm', '' using 3 title 'oneDNN', '' using 4 title 'PyTorch'
