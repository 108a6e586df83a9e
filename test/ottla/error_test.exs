defmodule Ottla.ErrorTest do
  use ExUnit.Case, async: true
  doctest Ottla.Error
end
