"""Reports over finished work: training runs side by side (`runs`), the paper's diagnostic analyses
(`analyze`, rendered by `analyze_report`), the quantization-error table (`quant`), and the end-to-end
demo (`demo`). Markdown tables come from `tables`, figures from `pissa.plots`."""
