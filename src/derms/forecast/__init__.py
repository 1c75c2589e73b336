"""Forecasting: load, PV and net load, probabilistic (quantiles), with baselines and backtests.

Public entry points: :func:`forecast_quantiles` (one series, one origin),
:func:`forecast_many` (a global model over many series), :func:`backtest`
(rolling-origin evaluation), :class:`ForecastSpec`, :func:`clean_series`,
:func:`clean_weather`.
"""

from derms.forecast.api import ForecastWarning, forecast_many, forecast_quantiles
from derms.forecast.backtest import BacktestResult, backtest
from derms.forecast.forecaster import ForecastSpec, GlobalForecaster
from derms.forecast.series import CleanSeries, clean_series, clean_weather

__all__ = ["BacktestResult", "CleanSeries", "ForecastSpec", "ForecastWarning",
           "GlobalForecaster", "backtest", "clean_series", "clean_weather", "forecast_many",
           "forecast_quantiles"]
